"""The raw shard layout and its fast read path: identical bytes to TensorStore and zarr-python, old layouts still
read, corruption detected."""

import hashlib
import json
import os
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from lepton_jax.errors import LakeError
from lepton_jax.lake import Lake, NpzSource, arrays, ingest, rawshards
from lepton_jax.lake.fragments import write_fragment
from lepton_jax.lake.storage import LocalStorage

SHARD_BYTES = 8192  # 28x28 uint8 examples: 10 per shard, 10 per inner chunk -> several shards per fragment


def _source(folder, seed, n):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.savez(folder / "part.npz", x=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), y=rng.integers(0, 3, n))
    return NpzSource(folder, value_range=(0, 255))


def _reader(tv, split):
    r = tv.reader(split)
    r.SMALL_ARRAY_BYTES = 4096  # serve the images from their shards (labels still from memory), whatever their size
    return r


def _codecs(tv, frag, name="image"):
    path = tv.lake.root / tv.table / frag["arrays"][name]["path"] / "zarr.json"
    return [c["name"] for c in json.loads(path.read_text())["codecs"][0]["configuration"]["codecs"]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A table whose first fragment per split is in the old zstd layout (one example per chunk) and whose appended
    fragment is in the raw layout."""
    root = tmp_path_factory.mktemp("raw")
    # the layout every table had before the raw one, then the default
    ingest(Lake(root / "lake", target_shard_bytes=SHARD_BYTES, compression="zstd"), "t", _source(root / "a", 0, 95),
           splits={"train": 0.8, "test": 0.2})
    lake = Lake(root / "lake", target_shard_bytes=SHARD_BYTES)
    return ingest(lake, "t", _source(root / "b", 1, 125), splits={"train": 0.8, "test": 0.2}, mode="append").version


@pytest.fixture(scope="module")
def raw_only(tmp_path_factory):
    """A table of two raw-layout fragments per split (ingest, then append)."""
    root = tmp_path_factory.mktemp("raw_only")
    lake = Lake(root / "lake", target_shard_bytes=SHARD_BYTES)
    ingest(lake, "t", _source(root / "a", 3, 70), splits={"train": 0.8, "test": 0.2})
    return ingest(lake, "t", _source(root / "b", 4, 90), splits={"train": 0.8, "test": 0.2}, mode="append").version


def test_layout_chunks_divide_shards_and_keep_the_zstd_option():
    for shape, target in [((200_000, 28, 28), arrays.TARGET_SHARD_BYTES), ((1000, 28, 28), arrays.TARGET_SHARD_BYTES),
                          ((95, 28, 28, 1), SHARD_BYTES), ((7, 3, 100), 10**6)]:
        per_shard, per_chunk = arrays.shard_layout(shape, np.uint8, target)
        example = int(np.prod(shape[1:]))
        assert per_shard % per_chunk == 0 and per_chunk * example <= max(example, arrays.RAW_CHUNK_BYTES)
        assert per_shard * example <= max(target, per_chunk * example)
    assert arrays.shard_layout((200_000, 28, 28), np.uint8) == (85573, 83)  # 83 x 784 B = 65,072 B per chunk
    assert arrays.shard_layout((200_000, 28, 28), np.uint8, compression="zstd") == (85598, 1)
    assert arrays.shard_layout((98_000,), np.int32) == (98304, 16384)  # labels: one shard, 64 KiB chunks
    assert arrays.shard_layout((98_000,), np.int32, compression="zstd") == (98000, 1000)  # the old ~4 KiB rule
    spec = arrays.zarr3_spec({"driver": "memory"}, (100, 28, 28), np.uint8)
    assert [c["name"] for c in spec["metadata"]["codecs"][0]["configuration"]["codecs"]] == ["bytes", "crc32c"]
    with pytest.raises(LakeError, match="unknown lake compression 'lz4'"):
        arrays.shard_layout((10, 28, 28), np.uint8, compression="lz4")


@pytest.mark.parametrize("table", ["mixed", "raw_only"])
def test_fast_path_reads_what_tensorstore_reads_across_fragments_and_shards(table, request):
    tv = request.getfixturevalue(table)
    for split in tv.splits:
        frags = tv.fragments(split)
        raw, zstd = ["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]
        assert [_codecs(tv, f) for f in frags] == ([zstd, raw] if table == "mixed" else [raw, raw])
        assert all(len(f["arrays"]["image"]["files"]) >= 3 for f in frags)  # zarr.json + 2 or more shards
        r = _reader(tv, split)
        whole = r.read()  # a slice: TensorStore reads (and crc32c-checks) every chunk
        assert (r._raw[0]["image"] is None) == (table == "mixed") and r._raw[1]["image"] is not None
        assert r._all_raw == (table == "raw_only") and "label" in r._in_memory
        n = len(r)
        expected = np.concatenate([_reader(tv, split)._open()[f]["image"].read().result() for f in range(2)])
        assert np.array_equal(whole["image"], expected)
        rng = np.random.default_rng(5)
        for idx in (rng.integers(0, n, 40), np.sort(rng.integers(0, n, 40)), np.array([n - 1, 0, 3, 3, n - 1, 3]),
                    np.arange(n)[::-1], np.array([-1, -n]), np.array([], np.int64)):
            got = r.read(idx)
            assert got["image"].dtype == np.uint8 and got["image"].shape == (len(idx), 28, 28, 1)
            assert np.array_equal(got["image"], whole["image"][idx]) and np.array_equal(got["label"],
                                                                                       whole["label"][idx])
        assert np.array_equal(r.read(n - 2)["image"], whole["image"][n - 2])
        assert np.array_equal(r.read(slice(1, n, 3))["image"], whole["image"][1:n:3])
        with pytest.raises(IndexError):
            r.read(np.array([n]))
        if table == "raw_only":  # labels too big to hold in memory are raw too: the whole batch takes the fast path
            r0 = tv.reader(split)
            r0.SMALL_ARRAY_BYTES = 0
            got = r0.read(idx := rng.integers(0, n, 30))
            assert r0._all_raw and not r0._in_memory and _codecs(tv, frags[0], "label") == raw
            assert np.array_equal(got["image"], whole["image"][idx]) and np.array_equal(got["label"],
                                                                                       whole["label"][idx])


def test_zarr_python_reads_raw_and_zstd_fragments_byte_identically(mixed):
    paths, expected = [], b""
    for split in mixed.splits:
        r = _reader(mixed, split)
        for f, frag in enumerate(mixed.fragments(split)):
            paths.append(str(mixed.lake.root / "t" / frag["arrays"]["image"]["path"]))
            lo, hi = int(r.offsets[f]), int(r.offsets[f + 1])
            expected += r.read(np.arange(lo, hi))["image"].tobytes()  # the fast path for the raw fragment
    code = ("import sys, zarr\nfor p in sys.argv[1:]:\n    sys.stdout.buffer.write(zarr.open_array(p, mode='r')[:]"
            ".tobytes())\n")
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, check=True).stdout
    assert out == expected


def _raw_table(tmp_path):
    lake = Lake(tmp_path / "lake", target_shard_bytes=SHARD_BYTES)
    tv = ingest(lake, "t", _source(tmp_path / "a", 2, 60), splits={"train": 1.0}).version
    meta = tv.fragments("train")[0]["arrays"]["image"]
    return tv, meta, tmp_path / "lake" / "t" / meta["path"]


def _flip(path, offset):
    """Flips one bit of ``path`` in place and restores its mtime (as a silent disk error or a careless tool would)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _one_line_error(fn, *names):
    with pytest.raises(LakeError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names), message


def test_a_byte_flipped_after_first_touch_fails_every_read_path(tmp_path):
    """Every read path checks the bytes it returns: the reader that already mapped the shard, a running Grain
    iterator (train_dataset), a new reader, the shard read directly (crc32c per inner chunk) and TensorStore slices
    all raise one line naming the damaged file; `lake verify` names it too."""
    import grain

    from lepton_jax.data.pipeline import train_dataset
    from lepton_jax.data.source import LakeDataSource

    tv, meta, base = _raw_table(tmp_path)
    reader = _reader(tv, "train")
    source = LakeDataSource(_reader(tv, "train"))
    batches = iter(train_dataset(source, global_batch_size=60, seed=0, num_epochs=None, schema=tv.schema,
                                 read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    before = reader.read(np.arange(0, 60, 7))  # this process has mapped (and checked) these shards now
    assert next(iter(next(batches).values())).shape[0] == 60
    shard = base / "c.1.0.0.0"
    _flip(shard, 100)  # a data byte of example 10 (shards of 10 examples)
    where = f"{meta['path']}/c.1.0.0.0"
    _one_line_error(lambda: reader.read(np.array([3, 10])), where)  # the same reader, shard already mapped
    _one_line_error(lambda: reader.read(10), where)
    _one_line_error(lambda: next(batches), where)  # every batch holds every row
    _one_line_error(lambda: _reader(tv, "train").read(np.array([10, 11])), where)  # a new reader
    raw = rawshards.open_raw(base, meta["files"], str(base))
    _one_line_error(lambda: raw.read(np.array([12])), f"{base}/c.1.0.0.0", "crc32c")  # per inner chunk
    _one_line_error(lambda: _reader(tv, "train").read(slice(10, 11)), meta["path"])  # TensorStore's crc32c
    _one_line_error(lambda: tv.reader("train").read_all(), meta["path"])
    # the damage is confined to its file: rows of other shards still read, unchanged
    assert np.array_equal(_reader(tv, "train").read(np.array([0, 21]))["image"], before["image"][[0, 3]])
    assert [p.path for p in tv.lake.verify()] == [where]


def test_reads_compare_rows_with_their_row_hash_keys_row_checks_or_whole_row_hashes(tmp_path):
    """The fast path re-hashes every row it returns and compares it with what the fragment stores: an xxh3-128
    fragment stores no row checks, and its rows are compared with the keys (first 8 bytes) of its row hashes; a sha256
    table's fragment stores the xxh3-64 of every row (``_rows.xxh3``) and is compared with those; a fragment whose
    hash file is not keys-first is compared with its whole row hashes. A changed byte of the data is named as
    differing; a changed hash or check file is named by the read (its digest) and by `lake verify`."""
    import xxhash

    from lepton_jax.lake import fragments
    from lepton_jax.lake.read import SplitReader

    idx = np.array([10, 3, 10, 59])
    where = "c.1.0.0.0"  # the shard holding example 10 (shards of 10 examples)

    # xxh3-128 (a new table's default): one hash file, its keys compared
    tv, meta, base = _raw_table(tmp_path)
    frag = tv.fragments("train")[0]
    images = _reader(tv, "train").read(slice(None))["image"]
    assert "row_checks" not in frag and not (base.parent / "_rows.xxh3").exists()
    hash_file = tmp_path / "lake" / "t" / frag["row_hashes"]["path"]
    keys = np.frombuffer(hash_file.read_bytes()[:8 * 60], ">u8")
    assert keys.tolist() == [xxhash.xxh3_128_intdigest(images[i].tobytes()) >> 64 for i in range(60)]
    reader = _reader(tv, "train")
    assert np.array_equal(reader.read(idx)["image"], images[idx]) and reader._checked == {0: "keys"}
    _flip(base / where, 100)  # a data byte of example 10
    _one_line_error(lambda: _reader(tv, "train").read(idx), f"{meta['path']}/{where}", "row hashes")
    _flip(base / where, 100)  # restored
    fragments._keys.clear()  # (this process wrote the table: its keys would come from memory)
    _flip(hash_file, 8 * 10)  # example 10's key
    _one_line_error(lambda: _reader(tv, "train").read(idx), frag["row_hashes"]["path"], "digest")
    assert [p.path for p in tv.lake.verify()] == [frag["row_hashes"]["path"]]
    _flip(hash_file, 8 * 10)

    # a hash file in the whole-row layout (written before keys-first): the whole row hashes are compared
    rows_32 = fragments.stored_row_hashes(hash_file.read_bytes(), frag["row_hashes"]).tobytes()
    (base.parent / "_rows.whole").write_bytes(rows_32)
    whole = {"path": f"{frag['path']}/_rows.whole", "bytes": len(rows_32), "hash": "xxh3_128",
             "sha256": hashlib.sha256(rows_32).hexdigest()}
    older = {**tv.record["splits"]["train"], "fragments": [{**frag, "row_hashes": whole}]}

    def reader_of_older():
        r = SplitReader(tv.lake.root, "t", tv.version, "train", older)
        r.SMALL_ARRAY_BYTES = 4096
        return r

    assert np.array_equal(reader_of_older().read(idx)["image"], images[idx])
    assert reader_of_older()._row_check_mode(0) == "hashes"
    _flip(base / where, 100)
    _one_line_error(lambda: reader_of_older().read(idx), f"{meta['path']}/{where}", "row hashes")

    # sha256 rows: the row checks (xxh3-64) are compared
    lake = Lake(tmp_path / "sha", target_shard_bytes=SHARD_BYTES)
    tv = ingest(lake, "t", _source(tmp_path / "b", 2, 60), splits={"train": 1.0}, row_hash="sha256").version
    frag = tv.fragments("train")[0]
    base = tmp_path / "sha" / "t" / frag["arrays"]["image"]["path"]
    checks_file = tmp_path / "sha" / "t" / frag["row_checks"]["path"]
    assert frag["row_checks"]["hash"] == "xxh3_64"
    assert np.frombuffer(checks_file.read_bytes(), "<u8").tolist() == [
        xxhash.xxh3_64_intdigest(images[i].tobytes()) for i in range(len(images))]
    reader = _reader(tv, "train")
    assert np.array_equal(reader.read(idx)["image"], images[idx]) and reader._checked == {0: "checks"}
    _flip(base / where, 100)
    _one_line_error(lambda: _reader(tv, "train").read(idx), where, "row checks")
    _flip(base / where, 100)
    _flip(checks_file, 3)
    _one_line_error(lambda: _reader(tv, "train").read(idx), frag["row_checks"]["path"], "digest")
    assert [p.path for p in tv.lake.verify()] == [frag["row_checks"]["path"]]


def test_a_batch_over_an_upgraded_fragment_with_row_checks_and_a_new_one_checks_each_its_own_way(tmp_path):
    """A table written by the previous revision (xxh3-128 fragments that also stored row checks) and appended to by
    this one: one batch spans both; the old fragment's rows are compared with its row checks, the new one's with
    its row-hash keys, and a changed byte in either is named."""
    from lepton_jax.lake import fragments
    from lepton_jax.lake.read import SplitReader

    tv, _, _ = _raw_table(tmp_path)
    tv = ingest(tv.lake, "t", _source(tmp_path / "b", 3, 40), splits={"train": 1.0}, mode="append").version
    old, new = tv.fragments("train")
    root = tmp_path / "lake" / "t"
    everything = _reader(tv, "train").read(slice(None))["image"]
    # the previous revision's fragment: its row checks file and entry, as that revision wrote them
    checks = fragments.row_checks({"image": everything[:60]})
    entry = {**tv.record["splits"]["train"], "fragments": [
        {**old, "row_checks": fragments.write_row_checks(tv.lake.storage, "t", old["path"], checks)}, new]}

    def reader():
        r = SplitReader(tv.lake.root, "t", tv.version, "train", entry)
        r.SMALL_ARRAY_BYTES = 4096
        return r

    idx = np.array([75, 3, 10, 99, 60])
    r = reader()
    assert np.array_equal(r.read(idx)["image"], everything[idx]) and r._checked == {0: "checks", 1: "keys"}
    for frag, row, what in ((old, 10, "row checks"), (new, 75 - 60, "row hashes")):
        shard = root / frag["arrays"]["image"]["path"] / f"c.{row // 10}.0.0.0"
        _flip(shard, 100 + (row % 10) * 784)  # a data byte of that row
        _one_line_error(lambda: reader().read(idx), f"c.{row // 10}.0.0.0", what)
        _flip(shard, 100 + (row % 10) * 784)
    assert np.array_equal(reader().read(idx)["image"], everything[idx])


def test_a_failure_beside_a_fragments_array_writes_publishes_nothing_and_leaves_no_data(tmp_path, monkeypatch):
    """write_fragment writes its arrays on helper threads; when the row files fail meanwhile (a full disk), the
    append raises, every helper and TensorStore write has stopped before the commit's data is discarded (nothing
    reappears), and the next append succeeds."""
    import time

    from lepton_jax.lake import fragments

    tv, _, _ = _raw_table(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fragments, "write_row_hashes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest(tv.lake, "t", _source(tmp_path / "b", 3, 40), splits={"train": 1.0}, mode="append")
    time.sleep(0.2)  # a write still running would recreate files under the discarded directory
    data = tmp_path / "lake" / "t" / "data"
    assert tv.lake.versions("t") == [1] and [p.name for p in data.iterdir()] == [tv.record["commit_id"]]
    monkeypatch.undo()
    again = ingest(tv.lake, "t", NpzSource(tmp_path / "b", value_range=(0, 255)), splits={"train": 1.0},
                   mode="append")
    assert again.version.version == 2 and tv.lake.verify() == []


def test_arrays_with_one_directory_per_axis_still_take_the_fast_path(tmp_path, monkeypatch):
    """New arrays name shard files ``c.<i>.0.0.0`` (one directory per array); arrays written before, with
    ``c/<i>/0/0/0``, are still served by the raw fast path, and a damaged shard of theirs is named by reads and by
    `lake verify`."""
    assert arrays.CHUNK_KEY_SEPARATOR == "."
    monkeypatch.setattr(arrays, "CHUNK_KEY_SEPARATOR", "/")
    tv, meta, base = _raw_table(tmp_path)
    assert sorted(meta["files"])[:2] == ["c/0/0/0/0", "c/1/0/0/0"]
    reader = _reader(tv, "train")
    before = reader.read(np.array([3, 10]))
    assert reader._all_raw and before["image"].shape == (2, 28, 28, 1)
    _flip(base / "c/1/0/0/0", 100)  # a data byte of example 10
    where = f"{meta['path']}/c/1/0/0/0"
    _one_line_error(lambda: _reader(tv, "train").read(np.array([10])), where)
    assert [p.path for p in tv.lake.verify()] == [where]


def _take_read_lock_in_child():
    from lepton_jax.lake import read as lake_read

    os._exit(0 if lake_read._RAW_LOCK.acquire(timeout=10) else 1)


def test_a_process_forked_while_the_raw_read_lock_is_held_gets_it_free():
    """Raw reads run one at a time per process (a module lock); a process forked while another thread holds it
    (Grain's read threads, a server's) gets it free (``os.register_at_fork``) instead of a lock that no thread of
    its own will release."""
    import multiprocessing

    from lepton_jax.lake import read as lake_read

    with lake_read._RAW_LOCK:  # as if another thread were in the middle of a read
        child = multiprocessing.get_context("fork").Process(target=_take_read_lock_in_child)
        child.start()
        child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0


def _read_in_child(root, in_memory, expected):
    if not np.array_equal(in_memory.read(slice(0, 5))["image"], expected):  # the parent's reader, from memory
        os._exit(5)
    try:
        _reader(Lake(root).table("t"), "train").read(np.arange(5))  # rows of the zstd fragment: TensorStore
    except LakeError as e:
        os._exit(0 if "forked from process" in str(e) and "'spawn'" in str(e) else 4)
    os._exit(3)


def test_a_child_forked_after_the_parent_used_tensorstore_gets_a_lake_error_not_an_abort(mixed):
    """TensorStore aborts (SIGABRT) a process forked from one that ran TensorStore operations; the lake raises a
    LakeError there instead, saying to use 'spawn' or 'forkserver' workers, and a reader the parent opened still
    serves what it holds in memory."""
    import multiprocessing

    _reader(mixed, "train").read(np.arange(5))  # this process has run TensorStore operations (open, zstd reads)
    in_memory = mixed.reader("train")  # a small split: held in memory once opened
    expected = in_memory.read(slice(0, 5))["image"]
    child = multiprocessing.get_context("fork").Process(target=_read_in_child,
                                                        args=(mixed.lake.root, in_memory, expected))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0, f"child exit code {child.exitcode} (-6: TensorStore aborted it)"


def test_corrupt_shard_index_crc32c_and_misplaced_chunks_are_detected(tmp_path):
    tv, meta, base = _raw_table(tmp_path)
    layout = rawshards.open_raw(base, meta["files"], str(base)).layout
    assert (layout.per_shard, layout.per_chunk, layout.chunk_bytes) == (10, 10, 7844)

    def damaged(edit, fix_crc):
        data = bytearray((base / "c.2.0.0.0").read_bytes())
        edit(data)
        if fix_crc:
            data[-4:] = google_crc32c.value(bytes(data[-layout.index_bytes:-4])).to_bytes(4, "little")
        path = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}"
        path.mkdir()  # served as shard 0 of a copy of the array
        (path / "c.0.0.0.0").write_bytes(bytes(data))
        (path / "zarr.json").write_bytes((base / "zarr.json").read_bytes())
        # the record's digest matches the damaged bytes: only the index checks can catch the damage
        files = {"c.0.0.0.0": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        return rawshards.open_raw(path, files, str(path))

    def flip_offset(d):
        d[-layout.index_bytes] ^= 0x08  # the first chunk's offset, low byte

    with pytest.raises(LakeError, match="shard index checksum mismatch"):
        damaged(flip_offset, fix_crc=False).read(np.array([0]))
    with pytest.raises(LakeError, match="missing or misplaced chunks"):
        damaged(lambda d: d.__setitem__(slice(-layout.index_bytes + 8, -layout.index_bytes + 16), b"\0" * 8),
                fix_crc=True).read(np.array([0]))
    assert np.array_equal(damaged(lambda d: None, fix_crc=False).read(np.array([0, 9])),
                          _reader(tv, "train").read(np.array([20, 29]))["image"])


def test_the_fast_path_is_only_for_local_raw_arrays_with_digests(tmp_path):
    storage = LocalStorage(tmp_path)
    x = np.arange(30 * 100, dtype=np.float32).reshape(30, 10, 10)
    arrays.write_array(storage, "raw", x, target_shard_bytes=4000)
    arrays.write_array(storage, "zstd", x, target_shard_bytes=4000, compression="zstd")
    files = arrays.file_digests(storage, "raw")
    raw = rawshards.open_raw(tmp_path / "raw", files, "raw")
    assert raw is not None and rawshards.open_raw(tmp_path / "zstd", files, "zstd") is None
    idx = np.array([0, 5, 9, 10, 29])
    assert np.array_equal(raw.read(idx), x[idx]) and raw.read(idx).dtype == np.float32


def test_mapped_shards_are_bounded_and_reopened_on_demand(raw_only, monkeypatch):
    """Every mapping holds a file descriptor before Python 3.13: a reader touching more shards than the bound keeps
    at most MAX_MAPPED_SHARDS mapped (descriptors closed) and re-maps evicted shards correctly."""
    monkeypatch.setattr(rawshards, "MAX_MAPPED_SHARDS", 2)
    r = _reader(raw_only, "train")
    whole = r.read()
    fds = len(os.listdir("/proc/self/fd"))
    rng = np.random.default_rng(8)
    for _ in range(5):
        idx = rng.integers(0, len(r), 50)  # touches every shard of both fragments
        assert np.array_equal(r.read(idx)["image"], whole["image"][idx])
    assert len(rawshards._mapped) <= 2 and len(os.listdir("/proc/self/fd")) <= fds + 2


def test_the_cli_picks_the_layout_of_new_fragments_and_content_does_not_depend_on_it(tmp_path, capsys):
    from lepton_jax.cli import main

    _source(tmp_path / "a", 7, 60)
    _source(tmp_path / "b", 8, 40)
    lake = tmp_path / "lake"
    base = ["--lake", str(lake), "--table", "t", "--splits", "train=0.8,test=0.2"]
    assert main(["lake", "ingest", *base, "--source", f"npz:{tmp_path / 'a'}", "--compression", "zstd"]) == 0
    assert main(["lake", "ingest", *base, "--source", f"npz:{tmp_path / 'b'}", "--mode", "append"]) == 0
    appended = Lake(lake).table("t")
    raw, zstd = ["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]
    for split in appended.splits:
        assert [_codecs(appended, f) for f in appended.fragments(split)] == [zstd, raw]
    assert main(["lake", "compact", "--lake", str(lake), "--table", "t", "--compression", "zstd"]) == 0
    compacted = Lake(lake).table("t")
    for split in compacted.splits:
        assert [_codecs(compacted, f) for f in compacted.fragments(split)] == [zstd]
        assert compacted.record["splits"][split]["content_sha256"] == appended.record["splits"][split][
            "content_sha256"]
        assert np.array_equal(_reader(compacted, split).read()["image"], _reader(appended, split).read()["image"])
    # a one-fragment split is rewritten only to change its layout, and only when the layout is asked for
    assert main(["lake", "compact", "--lake", str(lake), "--table", "t"]) == 0
    assert Lake(lake).versions("t") == [1, 2, 3] and "nothing to compact" in capsys.readouterr().out
    assert main(["lake", "compact", "--lake", str(lake), "--table", "t", "--compression", "none"]) == 0
    relaid = Lake(lake).table("t")
    assert relaid.version == 4 and Lake(lake).verify() == []
    for split in relaid.splits:
        assert [_codecs(relaid, f) for f in relaid.fragments(split)] == [raw]
        assert relaid.record["splits"][split]["content_sha256"] == appended.record["splits"][split]["content_sha256"]
    assert main(["lake", "compact", "--lake", str(lake), "--table", "t", "--compression", "none"]) == 0
    assert Lake(lake).versions("t") == [1, 2, 3, 4] and "all in the none layout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["lake", "ingest", *base, "--source", f"npz:{tmp_path / 'a'}", "--compression", "lz4"])
    assert e.value.code == 2 and "invalid choice: 'lz4'" in capsys.readouterr().err
    with pytest.raises(LakeError, match="unknown lake compression 'lz4'"):
        Lake(lake, compression="lz4")


def test_digests_recorded_at_write_time_match_the_bytes_on_disk(tmp_path):
    """The content digest is computed while TensorStore still writes the shards (``write_array`` and a fragment's
    arrays started together): it must equal the digest of what was stored, and every file digest must be the
    sha256 of the file's bytes as they lie on disk."""
    storage = LocalStorage(tmp_path)
    rng = np.random.default_rng(3)
    named = {"image": rng.integers(0, 255, size=(300, 10, 10), dtype=np.uint8),  # several shards, several in flight
             "label": rng.integers(0, 3, size=300).astype(np.int32)}
    entry = write_fragment(storage, "t", "data/c1/train/000000", named, target_shard_bytes=4000,
                           row_hash="xxh3_128")
    entries = {name: (f"t/{m['path']}", m) for name, m in entry["arrays"].items()}
    digest = arrays.write_array(storage, "single", named["image"], target_shard_bytes=4000)
    entries["single"] = ("single", {"sha256": digest, "files": arrays.file_digests(storage, "single")})
    for name, (key, meta) in entries.items():
        value = named["image" if name == "single" else name]
        assert meta["sha256"] == arrays.content_digest(value)
        assert meta["sha256"] == arrays.stored_content_digest(arrays.open_array(storage, key))
        assert set(meta["files"]) == {"zarr.json", *arrays.shard_keys(arrays.open_array(storage, key))}
        zarr_meta = json.loads((tmp_path / key / "zarr.json").read_bytes())
        for rel, info in meta["files"].items():
            data = (tmp_path / key / rel).read_bytes()
            if rel == "zarr.json":
                assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            else:  # a shard file is not read back to be hashed: its size, and its own crc32c hold
                assert info == {"bytes": len(data)} and arrays.shard_file_problem(data, zarr_meta) is None
                damaged = bytearray(data)
                damaged[len(data) // 3] ^= 0x10
                assert arrays.shard_file_problem(bytes(damaged), zarr_meta) is not None
