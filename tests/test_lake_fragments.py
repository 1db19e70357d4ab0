"""Fragments: append-only versions, compaction, streaming chunks across workers, crash safety of append/compact."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.errors import LakeError
from lepton_jax.lake import Lake, NpzSource, ingest
from lepton_jax.lake.faults import ENV, POINTS
from lepton_jax.lake.fragments import row_keys
from tests.lake_data import DyingSource, npz_shard, npz_source

SHARD_BYTES = 1024


def _shards(folder, seeds, n=60, labels=3):
    """A directory of npz shards (one chunk each): distinct random 8x8x1 uint8 images."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        np.savez(folder / f"part{k:03d}.npz", x=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                 y=rng.integers(0, labels, n))
    return folder


def _rows(tv, split=None):
    """Every (image bytes, label) of a version (or one split), in split order."""
    out = []
    for s in [split] if split else tv.splits:
        d = tv.reader(s).read_all()
        out += [im.tobytes() + bytes([lab]) for im, lab in zip(d["image"], d["label"], strict=True)]
    return out


def _source_rows(folder):
    out = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as d:
            out += [im.tobytes() + bytes([lab]) for im, lab in zip(d["x"], d["y"], strict=True)]
    return out


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_append_shares_fragments_and_compact_keeps_content(tmp_path):
    lake = Lake(tmp_path / "lake", target_shard_bytes=SHARD_BYTES)
    first = ingest(lake, "t", NpzSource(_shards(tmp_path / "a", [1, 2, 3])), splits={"train": 0.8, "test": 0.2})
    v1 = first.version
    assert sum(len(v1.fragments(s)) for s in v1.splits) == 6  # 3 chunks x 2 splits
    v1_rows = {s: _rows(v1, s) for s in v1.splits}
    assert sorted(sum(v1_rows.values(), [])) == sorted(_source_rows(tmp_path / "a"))
    # the appended shard: 20 new examples, 2 already in the table (same label), 1 with the table's content and
    # another label
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (23, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 23)
    with np.load(tmp_path / "a" / "part000.npz") as d:
        x[20:23], y[20:22], y[22] = d["x"][:3], d["y"][:2], (d["y"][2] + 1) % 3
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "new.npz", x=x, y=y)
    appended = ingest(lake, "t", NpzSource(tmp_path / "b"), mode="append", splits={"train": 0.8, "test": 0.2})
    v2 = appended.version
    assert appended.created and v2.version == 2 and v2.record["lineage"]["mode"] == "append"
    reasons = sorted((e["id"], e["reason"]) for e in v2.quarantine())
    assert reasons == [("new.npz[20]", "duplicate"), ("new.npz[21]", "duplicate"),
                       ("new.npz[22]", "conflicting_labels")]
    for s in v1.splits:  # old fragments shared (same paths), new ones added after them
        old = [f["path"] for f in v1.fragments(s)]
        assert [f["path"] for f in v2.fragments(s)][:len(old)] == old
        assert all(f["path"].startswith(f"data/{v2.record['commit_id']}/") for f in v2.fragments(s)[len(old):])
        assert _rows(v2, s)[:len(v1_rows[s])] == v1_rows[s]  # old rows first, unchanged
    new_rows = sorted(im.tobytes() + bytes([lab]) for im, lab in zip(x[:20], y[:20], strict=True))
    assert sorted(_rows(v2)) == sorted(sum(v1_rows.values(), []) + new_rows)  # exactly old + new
    assert {s: _rows(lake.table("t", 1), s) for s in v1.splits} == v1_rows  # time travel: v1 unchanged
    counts = [sum(v2.record["stats"]["splits"][s]["class_counts"][k] for s in v2.splits) for k in range(3)]
    assert counts == np.bincount(np.concatenate([np.frombuffer(r[-1:], np.uint8) for r in _rows(v2)]),
                                 minlength=3).tolist()
    table_bytes = _dir_bytes(tmp_path / "lake" / "t" / "data")
    assert _dir_bytes(tmp_path / "lake" / "t" / "data" / v2.record["commit_id"]) < 0.3 * table_bytes
    again = ingest(lake, "t", NpzSource(tmp_path / "b"), mode="append", splits={"train": 0.8, "test": 0.2})
    assert not again.created and lake.versions("t") == [1, 2]  # nothing new: no version

    # compaction: one fragment per split, the same rows in the same order, equal logical digests
    v3 = lake.compact("t")
    assert v3.version == 3 and v3.record["lineage"]["compacted_from"] == 2
    assert all(len(v3.fragments(s)) == 1 for s in v3.splits)
    for s in v2.splits:
        assert v3.record["splits"][s]["content_sha256"] == v2.record["splits"][s]["content_sha256"]
        a, b = v2.reader(s).read_all(), v3.reader(s).read_all()
        assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        # the compacted fragment's row-hash keys are the rows' own (so reads of it are checked as before); an
        # xxh3-128 table stores no separate row checks
        frag = v3.fragments(s)[0]
        stored = np.frombuffer((tmp_path / "lake" / "t" / frag["row_hashes"]["path"]).read_bytes(), ">u8")
        assert stored[:len(b["label"])].tolist() == row_keys(b, row_hash="xxh3_128").tolist()
        assert "row_checks" not in frag
    assert v3.record["stats"] == v2.record["stats"] and v3.quarantine() == v2.quarantine()
    assert lake.compact("t").version == 3  # nothing left to merge
    assert lake.verify() == [] and lake.gc(grace_seconds=0, force=True).removed == []  # every version still referenced
    # the latest version holds more than its last source: overwriting with that source is a new version
    again = ingest(lake, "t", NpzSource(tmp_path / "b"), splits={"train": 0.8, "test": 0.2})
    assert again.created and sum(again.version.num_examples(s) for s in again.version.splits) == 23
    # plain zarr-python reads every fragment of the appended version byte-identically
    frags = [f for s in v2.splits for f in v2.fragments(s)]
    paths = [str(tmp_path / "lake" / "t" / f["arrays"][name]["path"]) for name in ("image", "label") for f in frags]
    code = ("import sys, zarr\nfor p in sys.argv[1:]:\n    sys.stdout.buffer.write(zarr.open_array(p, mode='r')[:]"
            ".tobytes())\n")
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, check=True).stdout
    assert out == b"".join(v2.reader(s).read()[name].tobytes() for name in ("image", "label") for s in v2.splits)


def test_a_worker_process_killed_mid_ingest_fails_the_ingest_and_commits_nothing(tmp_path):
    """Workers are forked from a preloaded fork server; one SIGKILLed while loading its chunk (out of memory, say)
    is one clear error, the table keeps its previous version and nothing of the failed commit remains."""
    (tmp_path / "src").mkdir()
    for k in range(3):
        npz_shard(tmp_path / "src" / f"s{k}.npz", k)
    lake = Lake(tmp_path / "lake")
    ingest(lake, "t", npz_source(tmp_path / "src" / "s0.npz"))
    with pytest.raises(LakeError, match="an ingest worker process died"):
        ingest(lake, "t", DyingSource(tmp_path / "src"), workers=2)
    assert lake.versions("t") == [1] and lake.verify() == []
    assert lake.storage.list("t/data/") == [lake.table("t").record["commit_id"]]
    assert lake.storage.list("t/_leases/") == []


def test_chunks_in_two_workers_give_the_same_version_and_cross_chunk_dedup(tmp_path, capsys):
    folder = _shards(tmp_path / "src", [5, 6, 7, 8], n=40)
    # cross-chunk: part002 repeats two examples of part000 (one with the same label, one with another)
    with np.load(folder / "part000.npz") as a, np.load(folder / "part002.npz") as b:
        x, y = b["x"].copy(), b["y"].copy()
        x[:2], y[0], y[1] = a["x"][:2], a["y"][0], (a["y"][1] + 1) % 3
    np.savez(folder / "part002.npz", x=x, y=y)
    results = [ingest(Lake(tmp_path / f"lake{w}", target_shard_bytes=SHARD_BYTES), "t", NpzSource(folder),
                      splits={"train": 0.5, "test": 0.5}, workers=w) for w in (1, 2)]
    one, two = (r.version for r in results)
    for s in one.splits:
        assert one.record["splits"][s]["content_sha256"] == two.record["splits"][s]["content_sha256"]
        assert _rows(one, s) == _rows(two, s)
    assert one.quarantine() == two.quarantine()
    reasons = {e["id"]: e["reason"] for e in one.quarantine()}
    # the first copy of the conflicting content was written in chunk 0 and is removed from its fragment too
    assert reasons == {"part002.npz[0]": "duplicate", "part002.npz[1]": "conflicting_labels",
                       "part000.npz[1]": "conflicting_labels"}
    q = one.quarantine_reader().read()
    rows = {e["id"]: e["row"] for e in one.quarantine()}
    assert np.array_equal(q["image"][rows["part000.npz[1]"]], x[1])
    assert results[0].report["examples_in"] == 160 and results[0].report["examples_out"] == 157
    assert Lake(tmp_path / "lake2").verify() == []
    rewritten = [f["path"].rsplit("/", 1)[1] for s in two.splits for f in two.fragments(s) if f["path"][-1] == "r"]
    assert "000000r" in rewritten and "000002r" in rewritten  # chunk 0's fragment rewritten without the row
    assert main(["lake", "compact", "--lake", str(tmp_path / "lake2"), "--table", "t"]) == 0
    assert "fragments {'test': 4, 'train': 4} -> {'test': 1, 'train': 1}" in capsys.readouterr().out
    compacted = Lake(tmp_path / "lake2").table("t")
    assert all(_rows(compacted, s) == _rows(two, s) for s in two.splits) and compacted.version == 2


WRITER = """
import sys
from lepton_jax.lake import Lake, NpzSource, ingest
lake = Lake(sys.argv[1], target_shard_bytes=1024)
if sys.argv[2] == "compact":
    lake.compact("t")
else:
    ingest(lake, "t", NpzSource(sys.argv[3]), mode="append", retries=int(sys.argv[2]),
           splits={"train": 0.5, "test": 0.5})
"""


def _writer(*args, env=None):
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_append_or_compact_leaves_previous_or_new_version_and_racing_appends_are_distinct(tmp_path):
    import shutil

    base = tmp_path / "base"
    lake = Lake(base, target_shard_bytes=SHARD_BYTES)
    ingest(lake, "t", NpzSource(_shards(tmp_path / "a", [1, 2])), splits={"train": 0.5, "test": 0.5})
    ingest(lake, "t", NpzSource(_shards(tmp_path / "b", [3])), mode="append", splits={"train": 0.5, "test": 0.5})
    before = {v: _rows(lake.table("t", v)) for v in (1, 2)}
    extra = _shards(tmp_path / "c", [4])
    runs = {}
    for kind in ("append", "compact"):
        for point in POINTS:
            root = tmp_path / f"{kind}-{point}"
            shutil.copytree(base, root)
            runs[(kind, point)] = (root, _writer(root, "compact" if kind == "compact" else 0, extra,
                                                 env={ENV: point}))
    # two appends racing for version 3 of one table, each retrying on top of the other
    race = tmp_path / "race"
    shutil.copytree(base, race)
    racers = [_writer(race, 5, _shards(tmp_path / f"r{i}", [10 + i])) for i in range(2)]
    for (kind, point), (root, proc) in runs.items():
        proc.wait(timeout=180)
        assert proc.returncode == -9, (kind, point, proc.stderr.read().decode())
        lake = Lake(root)
        versions = lake.versions("t")
        assert versions == ([1, 2, 3] if point in ("published", "committed") else [1, 2]), (kind, point)
        assert {v: _rows(lake.table("t", v)) for v in (1, 2)} == before, (kind, point)
        if versions == [1, 2, 3]:
            expected = sorted(before[2] + (_source_rows(extra) if kind == "append" else []))
            assert sorted(_rows(lake.table("t", 3))) == expected, (kind, point)
        assert lake.verify() == [], (kind, point)
        lake.gc(grace_seconds=0, force=True)
        assert lake.verify() == [], (kind, point)
    for p in racers:
        assert p.wait(timeout=180) == 0, p.stderr.read().decode()
    lake = Lake(race)
    assert lake.versions("t") == [1, 2, 3, 4]
    assert [lake.table("t", v).record["parent"] for v in (3, 4)] == [2, 3]
    expected = before[2] + _source_rows(tmp_path / "r0") + _source_rows(tmp_path / "r1")
    assert sorted(_rows(lake.table("t", 4))) == sorted(expected)  # neither append lost
    assert lake.verify() == []


def test_bad_inputs_are_one_line_errors_or_quarantined_never_partial(tmp_path, capsys):
    from PIL import Image

    lake = str(tmp_path / "lake")
    (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "strings.npz", x=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1]))
    np.savez(tmp_path / "strlabels.npz", x=np.zeros((2, 2)), y=np.array(["a", "b"]))
    shards = _shards(tmp_path / "shards", [1, 2], n=10)
    (shards / "part999.npz").write_bytes(b"garbage")  # one bad shard among good ones: no partial version
    csv = tmp_path / "rows.csv"
    csv.write_text("t,ax,label\n" + "".join(f"{i},{i * 0.5},walk\n" for i in range(4)) + "4,2.0\n"
                   + "5,2.5,walk,extra\n" + "".join(f"{i},{i * 0.5},walk\n" for i in range(6, 12))
                   + "12,1.0,\n13,1.5,walk\n")
    for argv, message in [
        (["--source", f"npz:{tmp_path / 'notzip.npz'}"], "not a valid .npz archive"),
        (["--source", f"npz:{tmp_path / 'text.npz'}"], "not a valid .npz archive"),
        (["--source", f"npz:{tmp_path / 'strings.npz'}"], "have dtype <U1; lake arrays hold booleans"),
        (["--source", f"npz:{tmp_path / 'strlabels.npz'}"], "must be a 1-D integer array"),
        (["--source", f"npz:{shards}"], "part999.npz"),
        (["--source", "digits", "--workers", "0"], "--workers must be at least 1"),
        (["--source", "digits", "--mode", "append", "--mode", "overwrite"], "at most one of overwrite/append"),
    ]:
        assert main(["lake", "ingest", "--lake", lake, "--table", "t", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith("error:") and message in err, (argv, err)
        assert not (tmp_path / "lake" / "t").exists(), argv
    # CSV rows with missing or extra cells (or an empty label): their windows are quarantined, with the row named
    assert main(["lake", "ingest", "--lake", lake, "--table", "csv", "--source", f"csv:{csv}", "--window", "2",
                 "--splits", "train=0.5,test=0.5"]) == 0
    q = Lake(lake).table("csv").quarantine()
    assert [(e["id"], e["reason"]) for e in q] == [("rows 6-7", "malformed_row"), ("rows 14-15", "malformed_row")]
    assert "row 6 has 2 cell(s), the header 3" in q[0]["detail"]
    # images: PNG + JPEG, a text file, a broken PNG, a 16-bit PNG; labels outside --label-names
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "eel"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            img = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
            img.save(folder / label / f"{i}.png")
            img.save(folder / label / f"{i}.jpg", quality=95)
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    deep = (rng.integers(0, 65536, (6, 5))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "dog" / "deep.png")
    base = ["lake", "ingest", "--lake", lake, "--source", f"images:{folder}", "--splits", "train=0.5,test=0.5",
            "--label-names", "cat,dog"]
    assert main([*base, "--table", "rgb", "--mode", "RGB", "--workers", "2", "--chunk", "10"]) == 0  # 4 chunks
    tv = Lake(lake).table("rgb")
    reasons = {e["id"]: e["reason"] for e in tv.quarantine()}
    assert reasons["cat/notes.txt"] == "not_an_image" and reasons["cat/broken.png"] == "unreadable"
    assert reasons["dog/deep.png"] == "bit_depth" and "--bits 16" in {e["id"]: e["detail"]
                                                                       for e in tv.quarantine()}["dog/deep.png"]
    assert sum(r == "label_domain" for r in reasons.values()) == 12  # eel/* is outside --label-names
    assert tv.schema["arrays"]["image"] == {"dtype": "uint8", "example_shape": [6, 5, 3], "value_range": [0.0, 255.0]}
    assert sum(tv.num_examples(s) for s in tv.splits) == 24  # 12 PNG + 12 JPEG of cat and dog
    assert main([*base, "--table", "deep", "--bits", "16", "--resize", "5x6"]) == 0
    tv = Lake(lake).table("deep")
    assert tv.schema["arrays"]["image"]["dtype"] == "uint16" and "dog/deep.png" not in {e["id"] for e in
                                                                                         tv.quarantine()}
    images = np.concatenate([tv.reader(s).read()["image"] for s in tv.splits])
    assert images.max() > 255 and any(np.array_equal(im[..., 0], deep) for im in images)  # kept, not clipped
    capsys.readouterr()


def test_a_version_1_table_stays_readable_and_takes_appends(tmp_path):
    """Records written before fragments (format lepton-lake/1: one array per split) still read, verify, time-travel,
    and an append lists the old array as the split's first fragment."""
    import hashlib
    import json

    from lepton_jax.lake import arrays
    from lepton_jax.lake.storage import LocalStorage

    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 30)
    root = tmp_path / "lake"
    split = {}
    for name, value in (("image", x), ("label", y.astype(np.int32))):
        rel = f"data/c1/train/{name}"
        digest = arrays.write_array(LocalStorage(root), f"t/{rel}", value, target_shard_bytes=SHARD_BYTES)
        split[name] = {"path": rel, "dtype": value.dtype.name, "shape": list(value.shape), "sha256": digest,
                       "files": arrays.file_digests(LocalStorage(root), f"t/{rel}")}
    record = {"format": "lepton-lake/1", "table": "t", "version": 1, "parent": None, "commit_id": "c1", "time": 0.0,
              "schema": {"arrays": {"image": {"dtype": "uint8", "example_shape": [8, 8, 1],
                                              "value_range": [0.0, 255.0]}},
                         "label_array": "label", "label_names": ["0", "1", "2"]},
              "lineage": {"source": {"sha256": hashlib.sha256(b"v1").hexdigest(), "uri": "x", "name": "npz"},
                          "split": {"from_source": True}},
              "stats": {"splits": {"train": {"num_examples": 30, "class_counts": np.bincount(y, minlength=3).tolist(),
                                             "image": {"mean": float(x.mean()), "std": float(x.std()),
                                                       "min": float(x.min()), "max": float(x.max())}}}},
              "splits": {"train": {"num_examples": 30, "arrays": split}}, "quarantine": {"num_examples": 0}}
    (root / "t" / "_log").mkdir(parents=True)
    (root / "t" / "_log" / "00000001.json").write_text(json.dumps(record))
    lake = Lake(root, target_shard_bytes=SHARD_BYTES)
    assert lake.verify() == [] and np.array_equal(lake.table("t").reader("train").read()["image"], x)
    new = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    (tmp_path / "new").mkdir()
    np.savez(tmp_path / "new" / "a.npz", x=np.concatenate([new, x[:2]]), y=np.concatenate([rng.integers(0, 3, 10),
                                                                                           y[:2]]),
             split=np.full(12, "train"))
    v2 = ingest(lake, "t", NpzSource(tmp_path / "new", split_key="split"), mode="append").version
    assert [f["path"] for f in v2.fragments("train")][0] == "data/c1/train"
    assert np.array_equal(v2.reader("train").read()["image"], np.concatenate([x, new]))  # the 2 repeats dropped
    assert v2.record["stats"]["splits"]["train"]["num_examples"] == 40
    assert lake.verify() == [] and lake.table("t", 1).record["format"] == "lepton-lake/1"


def test_chunk_split_is_seeded_stratified_and_unbiased():
    from lepton_jax.lake.chunks import chunk_split

    labels = np.repeat(np.arange(10), 51)
    fractions = {"train": 0.7, "dev": 0.15, "test": 0.15}
    totals = dict.fromkeys(fractions, 0)
    for chunk in range(40):
        parts = chunk_split(labels, fractions, seed=3, chunk=chunk)
        assert all(np.array_equal(parts[s], chunk_split(labels, fractions, seed=3, chunk=chunk)[s]) for s in parts)
        assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(labels.size))
        for s, idx in parts.items():
            assert np.all(np.abs(np.bincount(labels[idx], minlength=10) - 51 * fractions[s]) < 1)  # stratified
            totals[s] += idx.size
    other_seed = chunk_split(labels, fractions, seed=4, chunk=0)["train"]
    assert not np.array_equal(chunk_split(labels, fractions, seed=3, chunk=0)["train"], other_seed)
    # systematic rounding: over many chunks no split gets more than its share (largest-remainder rounding would give
    # train 36 of every 51, i.e. +120 here)
    assert all(abs(totals[s] - 40 * 510 * f) < 60 for s, f in fractions.items()), totals


def test_verify_checks_row_hashes_and_the_logical_digest(tmp_path):
    import json

    lake = Lake(tmp_path / "lake", target_shard_bytes=SHARD_BYTES)
    tv = ingest(lake, "t", NpzSource(_shards(tmp_path / "a", [1, 2])), splits={"train": 0.5, "test": 0.5}).version
    first, second = tv.fragments("train")
    hashes = tmp_path / "lake" / "t" / first["row_hashes"]["path"]
    good = hashes.read_bytes()
    hashes.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    assert [p.path for p in lake.verify()] == [first["row_hashes"]["path"]]
    hashes.write_bytes(good)
    record_path = tmp_path / "lake" / "t" / "_log" / "00000001.json"
    record = json.loads(record_path.read_text())
    frags = record["splits"]["train"]["fragments"]
    frags[0], frags[1] = frags[1], frags[0]  # every file intact, but the split's rows in another order
    record_path.write_text(json.dumps(record))  # an edit: the record's own digest names it
    assert [p.message for p in lake.verify()][0].endswith("does not match its own digest (record_sha256): it was "
                                                          "edited after it was published; restore it from a backup "
                                                          "or re-ingest the source")
    from lepton_jax.lake import records

    record_path.write_text(json.dumps(records.seal(record)))  # a writer's bug, sealed as written: the logical digest
    assert [(p.path, p.message) for p in lake.verify()] == [("train", "logical content digest differs from the "
                                                                      "commit record")]


def test_the_content_chain_ignores_fragment_cuts_and_an_append_continues_it_from_the_record(tmp_path):
    """The same rows cut into fragments differently give the same split digest (compaction keeps it), and a chain
    continued from a record's entry (an append: none of the old rows read) equals the chain over all rows."""
    from lepton_jax.lake.fragments import KEYS_FIRST, content_chain, read_row_hashes

    lake = Lake(tmp_path / "lake")
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (200, 3, 3), dtype=np.uint8), rng.integers(0, 4, 200).astype(np.int32)

    def cut(name, bounds):
        return [lake.write_fragment("t", f"data/{name}/s/{k:03d}", {"x": x[a:b], "label": y[a:b]},
                                    row_hash="xxh3_128")
                for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]

    one, many = cut("one", [0, 200]), cut("many", [0, 70, 71, 150, 200])
    assert one[0]["row_hashes"]["layout"] == KEYS_FIRST
    assert np.array_equal(read_row_hashes(lake.storage, "t", one[0]),
                          np.concatenate([read_row_hashes(lake.storage, "t", f) for f in many]))
    whole = content_chain(lake.storage, "t", one)
    assert content_chain(lake.storage, "t", many) == whole
    head = {"fragments": many[:3], **content_chain(lake.storage, "t", many[:3])}
    assert content_chain(lake.storage, "t", many, extends=head) == whole
    y2 = y.copy()
    y2[199] = (y2[199] + 1) % 4  # one label differs: another digest
    other = [lake.write_fragment("t", "data/other/s/000", {"x": x, "label": y2}, row_hash="xxh3_128")]
    assert content_chain(lake.storage, "t", other)["content_sha256"] != whole["content_sha256"]
