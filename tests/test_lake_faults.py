"""Crash safety, concurrent writers, pinned readers under gc, and detection of damaged files."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import Lake, NpzSource, ingest, records
from lepton_jax.lake.faults import ENV, POINTS
from lepton_jax.lake.fragments import row_hashes
from tests.lake_data import version_rows

SHARD_BYTES = 1024  # 16 examples of 8x8x1 uint8 per shard: every array has several shards

WRITER = """
import sys
from lepton_jax.lake import Lake, NpzSource, ingest
lake = Lake(sys.argv[1], target_shard_bytes=int(sys.argv[3]))
for path in sys.argv[4:]:
    ingest(lake, "t", NpzSource(path, value_range=(0, 255), split_key="split"), retries=int(sys.argv[2]))
"""


def _npz(path, seed, n=300):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    split = np.where(np.arange(n) % 5 == 0, "test", "train")  # splits from the source: no sklearn in the writer
    np.savez(path, x=x, y=np.arange(n) % 3, split=split)
    return path


def _source(path):
    return NpzSource(path, value_range=(0, 255), split_key="split")




def _source_rows(path):
    with np.load(path) as d:
        return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(d["x"], d["y"], strict=True))


def _writer(lake, *sources, retries=0, env=None):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(lake), str(retries), str(SHARD_BYTES),
                             *map(str, sources)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _live_commit_ids(lake, table="t"):
    return {lake.table(table, v).record["commit_id"] for v in lake.versions(table)}


def test_writer_killed_at_any_point_leaves_the_previous_or_the_new_version(tmp_path):
    base = tmp_path / "base"
    first, second = _npz(tmp_path / "v1.npz", 0), _npz(tmp_path / "v2.npz", 1)
    ingest(Lake(base, target_shard_bytes=SHARD_BYTES), "t", _source(first))
    v1_rows = version_rows(Lake(base).table("t", 1))
    # six named crash points, plus kills after seeded random delays (anywhere: mid-shard, mid-record, ...)
    delays = np.random.default_rng(0).uniform(0.3, 1.2, size=2)
    runs = {}
    for name in [*POINTS, *(f"delay{d:.2f}" for d in delays)]:
        lake = tmp_path / name
        shutil.copytree(base, lake)
        env = {ENV: name} if name in POINTS else {}
        runs[name] = (lake, _writer(lake, second, env=env), time.monotonic())
    for name, (_, proc, started) in runs.items():
        if name.startswith("delay"):
            time.sleep(max(0.0, started + float(name[5:]) - time.monotonic()))
            proc.kill()
        proc.wait(timeout=120)
        if name in POINTS:
            assert proc.returncode == -9, (name, proc.stderr.read().decode())
    for name, (root, _, _) in runs.items():
        lake = Lake(root)
        versions = lake.versions("t")
        assert versions in ([1], [1, 2]), (name, versions)
        if name in POINTS:  # a version exists exactly when its record was linked
            assert versions == ([1, 2] if name in ("published", "committed") else [1]), name
        assert version_rows(lake.table("t", 1)) == v1_rows
        if versions == [1, 2]:
            assert version_rows(lake.table("t", 2)) == _source_rows(second)
        assert lake.verify() == [], name
        report = lake.gc(grace_seconds=0, force=True)
        data_dirs = {p.name for p in (root / "t" / "data").iterdir()}
        assert data_dirs == _live_commit_ids(lake), name
        assert not list((root / "t" / "_log").glob(".commit-*")), name
        if name in ("shard", "array", "data", "record"):  # these left an orphan (and a temp record) behind
            assert report.removed, name
        assert lake.verify() == [], name
        again = ingest(Lake(root, target_shard_bytes=SHARD_BYTES), "t", _source(second))
        assert lake.versions("t") == [1, 2] and again.created == (versions == [1])


def test_two_processes_committing_concurrently_give_a_linear_history(tmp_path):
    sources = [_npz(tmp_path / f"s{i}.npz", 10 + i, n=60) for i in range(6)]
    root = tmp_path / "lake"
    procs = [_writer(root, *sources[:3], retries=10), _writer(root, *sources[3:], retries=10)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    lake = Lake(root)
    assert lake.versions("t") == [1, 2, 3, 4, 5, 6]
    records = [lake.table("t", v).record for v in range(1, 7)]
    assert [r["parent"] for r in records] == [None, 1, 2, 3, 4, 5]
    loaded = [_source(s).load() for s in sources]
    # over the row hashes (one hashing pass) of the table's row hash
    expected = {d.digest(row_hashes(d.arrays, row_hash="xxh3_128"), row_hash="xxh3_128") for d in loaded}
    assert {r["lineage"]["source"]["sha256"] for r in records} == expected  # no commit lost
    assert lake.verify() == []
    assert {p.name for p in (root / "t" / "data").iterdir()} == _live_commit_ids(lake)  # losers cleaned up


def test_commit_conflict_fails_or_retries_on_top(tmp_path):
    lake = Lake(tmp_path)
    arrays = {"train": {"image": np.arange(8, dtype=np.uint8).reshape(4, 2), "label": np.zeros(4, np.int32)}}
    kwargs = {"schema": {"label_names": ["a"], "arrays": {}, "label_array": "label"}, "lineage": {}}
    lake.commit("t", arrays, parent=0, **kwargs)
    with pytest.raises(CommitConflictError, match="version 1 was committed by another writer"):
        lake.commit("t", arrays, parent=0, **kwargs)
    retried = lake.commit("t", arrays, parent=0, retries=1, **kwargs)
    assert retried.version == 2 and retried.record["parent"] == 1
    same = lake.commit("t", arrays, parent=0, retries=1, rebase=lambda latest: latest, **kwargs)
    assert same.version == 2  # the rebase said the latest already holds this: nothing new published
    assert lake.versions("t") == [1, 2]
    assert {p.name for p in (tmp_path / "t" / "data").iterdir()} == _live_commit_ids(lake)


def test_pinned_reader_sees_identical_bytes_while_another_process_commits_and_collects(tmp_path):
    root = tmp_path / "lake"
    first, second = _npz(tmp_path / "a.npz", 0), _npz(tmp_path / "b.npz", 1)
    ingest(Lake(root, target_shard_bytes=SHARD_BYTES), "t", _source(first))
    pinned = Lake(root).table("t")
    reader = pinned.reader("train")
    before = reader.read()
    # an orphan from a crashed commit, old enough for gc
    live = next((root / "t" / "data").iterdir())
    orphan = root / "t" / "data" / "19700101T000000-deadbeef0000"
    shutil.copytree(live, orphan)
    for p in [orphan, *orphan.rglob("*")]:
        os.utime(p, (1, 1))
    code = WRITER + "print(lake.gc(0, force=True).removed)\n"
    out = subprocess.run([sys.executable, "-c", code, str(root), "0", str(SHARD_BYTES), str(second)],
                         capture_output=True, check=True, text=True).stdout
    assert "19700101T000000-deadbeef0000" in out and not orphan.exists()
    assert Lake(root).versions("t") == [1, 2]
    for r in (reader, Lake(root).table("t", 1).reader("train")):
        after = r.read()
        assert all(np.array_equal(before[k], after[k]) for k in before)
    assert Lake(root).verify() == []


def _shard(tv, split, array, index=0):
    meta = tv.fragments(split)[0]["arrays"][array]
    rel = sorted(f for f in meta["files"] if f != "zarr.json")[index]
    return tv.lake.root / tv.table / meta["path"] / rel, f"{meta['path']}/{rel}"


@pytest.fixture
def damaged(tmp_path):
    src = _npz(tmp_path / "a.npz", 0)
    ingest(Lake(tmp_path / "lake", target_shard_bytes=SHARD_BYTES), "t", _source(src))
    return Lake(tmp_path / "lake").table("t")


def test_truncated_shard_is_named_by_reader_and_verify(damaged):
    path, rel = _shard(damaged, "train", "image", 2)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(LakeError, match=f"lake file .*{rel} has .* bytes"):
        damaged.reader("train").read(0)
    assert [p.path for p in damaged.lake.verify()] == [rel]


def test_damaged_shard_index_is_detected(damaged):
    path, rel = _shard(damaged, "test", "image", 0)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x01  # the index (with its crc32c) sits at the end of the shard
    path.write_bytes(bytes(data))
    meta_path = damaged.fragments("test")[0]["arrays"]["image"]["path"]
    with pytest.raises(LakeError, match=f"corrupt lake array {meta_path}"):
        damaged.reader("test").read(np.arange(5))
    problems = damaged.lake.verify()
    # the shard file is checked by its own crc32c (it is not read back to be hashed when it is written)
    assert [(p.path, p.message) for p in problems] == [(rel, "shard index crc32c mismatch (bytes changed)")]


def test_verify_reports_every_bad_shard_and_the_cli_exits_2(damaged, capsys):
    flipped, flipped_rel = _shard(damaged, "train", "image", 1)
    data = bytearray(flipped.read_bytes())
    data[3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing, missing_rel = _shard(damaged, "train", "label", 0)
    missing.unlink()
    truncated, truncated_rel = _shard(damaged, "test", "image", 1)
    truncated.write_bytes(b"")
    with pytest.raises(LakeError, match=f"lake file .*{missing_rel} is missing"):
        damaged.reader("train").read(0)
    assert sorted(p.path for p in damaged.lake.verify()) == sorted([flipped_rel, missing_rel, truncated_rel])
    code = main(["lake", "verify", "--lake", str(damaged.lake.root)])
    out, err = capsys.readouterr()
    assert code == 2
    assert all(rel in out for rel in (flipped_rel, missing_rel, truncated_rel)) and out.count("BAD ") == 3
    assert err.count("error:") == 1 and "3 problem(s)" in err


def test_content_change_with_valid_checksums_is_caught_by_content_digest(damaged):
    """A shard replaced by another valid shard (crc32c fine, sizes may match) is still caught."""
    a, a_rel = _shard(damaged, "train", "image", 0)
    b, _ = _shard(damaged, "train", "image", 1)
    shutil.copyfile(b, a)
    problems = damaged.lake.verify()
    assert a_rel in [p.path for p in problems]


def test_missing_or_unsafe_paths_in_a_record_are_errors(damaged):
    record_path = damaged.lake.root / "t" / "_log" / "00000001.json"
    record = json.loads(record_path.read_text())
    record["splits"]["train"]["fragments"][0]["arrays"]["image"]["path"] = "data/../../../etc"
    record_path.write_text(json.dumps(records.seal(record)))  # sealed as written: a buggy or hostile writer
    with pytest.raises(LakeError, match="unsafe array path"):
        damaged.lake.table("t").reader("train").read(0)
    with pytest.raises(LakeError, match="invalid table name '../t'"):
        damaged.lake.verify("../t")
