import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import DigitsSource, Lake, NpzSource, ingest
from lepton_jax.lake.ingest import stratified_split


def test_digits_round_trip_and_stratified_split(lake_root):
    table = Lake(lake_root).table("digits")
    digits = load_digits()
    sizes = {s: table.num_examples(s) for s in table.splits}
    assert sum(sizes.values()) == 1797 and sizes["train"] == 1257
    all_images, all_labels = [], []
    for split in ("train", "dev", "test"):
        data = table.reader(split).read_all()
        assert data["image"].dtype == np.uint8 and data["image"].shape[1:] == (8, 8, 1)
        all_images.append(data["image"][..., 0])
        all_labels.append(data["label"])
        # stratified: every class's share in the split is within one example of its share overall
        expected = np.bincount(digits.target, minlength=10) * sizes[split] / 1797
        assert np.all(np.abs(np.bincount(data["label"], minlength=10) - expected) <= 1.0)
    # the union of the splits is exactly the source: same multiset of (image, label) rows
    stored = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(np.concatenate(all_images),
                                                                      np.concatenate(all_labels), strict=True))
    source = sorted(img.astype(np.uint8).tobytes() + bytes([lab]) for img, lab in zip(digits.images,
                                                                                      digits.target, strict=True))
    assert stored == source
    stats = table.record["stats"]["splits"]["train"]
    assert stats["class_counts"] == np.bincount(table.reader("train").read()["label"], minlength=10).tolist()


def test_split_is_seeded():
    labels = np.repeat(np.arange(5), 40)
    a = stratified_split(labels, {"train": 0.6, "dev": 0.2, "test": 0.2}, seed=3)
    b = stratified_split(labels, {"train": 0.6, "dev": 0.2, "test": 0.2}, seed=3)
    c = stratified_split(labels, {"train": 0.6, "dev": 0.2, "test": 0.2}, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(200))


def test_reingest_identical_source_is_a_noop(tmp_path):
    lake = Lake(tmp_path)
    first = ingest(lake, "digits", DigitsSource())
    second = ingest(lake, "digits", DigitsSource())
    assert first.created and not second.created
    assert lake.versions("digits") == [1]
    third = ingest(lake, "digits", DigitsSource(), seed=1)  # a different split is a new version
    assert third.created and lake.versions("digits") == [1, 2]
    assert third.version.record["parent"] == 1
    assert lake.table("digits", 1).record["lineage"]["split"]["seed"] == 0  # old version still readable


def test_cleaning_drops_non_finite_and_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(60, 4, 4, 1)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    x[5, 0, 0, 0] = np.nan
    x[7] = x[6]  # exact duplicate (same label)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    result = ingest(Lake(tmp_path / "lake"), "toy", NpzSource(tmp_path / "src.npz", value_range=(0.0, 1.0)))
    assert result.report == {"examples_in": 60, "examples_out": 58, "quarantined": 2, "non_finite": 1, "duplicate": 1}
    total = sum(result.version.num_examples(s) for s in result.version.splits)
    assert total == 58
    reasons = {e["index"]: e["reason"] for e in result.version.quarantine()}
    assert reasons == {5: "non_finite", 7: "duplicate"}
    # the chunk's fragments, first written with every valid row, were rewritten without the duplicate
    served = np.concatenate([result.version.reader(s).read()["image"] for s in result.version.splits])
    expected = np.delete(x, [5, 7], axis=0)
    assert sorted(r.tobytes() for r in served) == sorted(r.tobytes() for r in expected)


def test_zarr_python_reads_lake_arrays_without_lepton(lake_root):
    table = Lake(lake_root).table("digits")
    (fragment,) = table.fragments("dev")
    path = lake_root / "digits" / fragment["arrays"]["image"]["path"]
    code = ("import sys, zarr, numpy as np; a = zarr.open_array(sys.argv[1], mode='r')[:]; "
            "sys.stdout.buffer.write(a.tobytes())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True).stdout
    assert "lepton_jax" not in code
    assert out == table.reader("dev").read()["image"].tobytes()


def test_concurrent_commit_of_same_version_conflicts(tmp_path):
    lake = Lake(tmp_path)
    arrays = {"train": {"image": np.zeros((4, 2), np.uint8), "label": np.zeros(4, np.int32)}}
    kwargs = {"schema": {"label_names": ["a"], "arrays": {}, "label_array": "label"}, "lineage": {}}
    lake.commit("t", arrays, parent=0, **kwargs)
    with pytest.raises(CommitConflictError, match="version 1 was committed by another writer"):
        lake.commit("t", arrays, parent=0, **kwargs)
    assert lake.versions("t") == [1]
    assert not list((tmp_path / "t" / "_log").glob(".commit-*"))  # no temp record left behind


def test_bad_names_and_missing_tables(tmp_path, lake_root):
    with pytest.raises(LakeError, match="invalid table name '../evil'"):
        Lake(tmp_path).table("../evil")
    with pytest.raises(LakeError, match="has no table 'nope'"):
        Lake(lake_root).table("nope")
    with pytest.raises(LakeError, match="has no version 9"):
        Lake(lake_root).table("digits", 9)
    with pytest.raises(LakeError, match="has no split 'val'"):
        Lake(lake_root).table("digits").reader("val")


def test_flipped_byte_in_a_shard_is_detected(tmp_path):
    lake = Lake(tmp_path)
    ingest(lake, "digits", DigitsSource())
    meta = lake.table("digits").fragments("test")[0]["arrays"]["image"]
    shard = next(p for p in (tmp_path / "digits" / meta["path"]).iterdir() if p.name.startswith("c."))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LakeError, match=f"corrupt lake array {meta['path']}"):
        lake.table("digits").reader("test").read()


def test_corrupt_commit_record_is_reported(tmp_path):
    lake = Lake(tmp_path)
    ingest(lake, "digits", DigitsSource())
    record = tmp_path / "digits" / "_log" / "00000001.json"
    record.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LakeError, match="is not a lepton-lake record"):
        lake.table("digits")
