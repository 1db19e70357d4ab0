"""The vectorised steps of a chunk (row hashes, labels by lookup table) against their per-example definitions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import xxhash

from lepton_jax.errors import LakeError
from lepton_jax.lake.chunks import _label
from lepton_jax.lake.fragments import row_checks, row_digests, row_hashes
from lepton_jax.lake.sources import SourceData


def test_row_hashes_and_checks_are_sha256_or_xxh3_of_each_rows_bytes_in_sorted_array_order():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 3, 4), dtype=np.uint8)
    a = rng.random((50, 2))
    for row_hash, digest in (("sha256", lambda b: hashlib.sha256(b).digest()),
                             ("xxh3_128", lambda b: xxhash.xxh3_128_digest(b) + bytes(16))):  # 16 B in a 32 B slot
        one = row_hashes({"x": x, "label": np.zeros(50, np.int32)}, row_hash=row_hash)
        two = row_hashes({"x": x, "a": a, "label": np.zeros(50, np.int32)}, row_hash=row_hash)
        both = row_digests({"x": x, "a": a}, row_hash=row_hash)
        for i in range(50):
            assert one[i].tobytes() == digest(x[i].tobytes())
            assert two[i].tobytes() == digest(a[i].tobytes() + x[i].tobytes())  # "a" sorts first
        assert np.array_equal(both[0], two)
        assert row_hashes({"x": x[:0]}, row_hash=row_hash).shape == (0, 32)
    with pytest.raises(LakeError, match="unknown row hash 'md5'"):
        row_hashes({"x": x}, row_hash="md5")
    # the reads' row checks: xxh3-64 of the same bytes, as uint64
    assert row_checks({"x": x, "label": np.zeros(50, np.int32)}).tolist() == [
        xxhash.xxh3_64_intdigest(x[i].tobytes()) for i in range(50)]
    assert row_checks({"x": x, "a": a}).tolist() == [
        xxhash.xxh3_64_intdigest(a[i].tobytes() + x[i].tobytes()) for i in range(50)]
    assert row_checks({"x": x[:0]}).shape == (0,)


@pytest.mark.parametrize("label_map", [None, {"cat": "animal", "dog": "animal", "car": "thing"}, {"cat": "c"}])
@pytest.mark.parametrize("label_names", [None, ["animal", "c", "dog"]])
def test_labels_by_lookup_table_equal_the_per_example_labelling(label_map, label_names):
    rng = np.random.default_rng(1)
    src = rng.integers(-1, 5, size=200)  # 3 and 4 and -1 are outside the source's 3 label names
    data = SourceData({"x": np.zeros((200, 2), np.float32)}, src, ["cat", "dog", "car"], {"x": (0.0, 1.0)}, "mem://")
    labels, names, rejects = _label(data, label_map, None, label_names)

    def by_example(example, source_name):  # the same labelling, one example at a time
        if label_map is None:
            return source_name
        return label_map.get(source_name) if source_name is not None else None

    ref_labels, ref_names, ref_rejects = _label(data, None, by_example, label_names)
    if label_names is None and label_map is None:
        assert names == ["cat", "dog", "car"]
    else:
        assert names == ref_names
    assert [names[k] if k >= 0 else None for k in labels] == [ref_names[k] if k >= 0 else None for k in ref_labels]
    assert set(rejects) == set(ref_rejects)
    for i, (reason, detail) in rejects.items():
        if label_map is None and not 0 <= src[i] < 3:  # without a map a bad index is outside the domain
            assert (reason, ref_rejects[i][0]) == ("label_domain", "unlabelled") and "label index" in detail
        else:
            assert reason == ref_rejects[i][0]
            assert f"example {i}" in detail


def test_image_folder_majority_shape_is_the_same_scanned_in_parallel(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from lepton_jax.lake.sources import ImageFolderSource

    for label, shapes in (("a", [(4, 5), (6, 7), (4, 5)]), ("b", [(6, 7), (6, 7), (4, 5)])):  # a tie: 3 and 3
        (tmp_path / label).mkdir()
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "b" / "z.txt").write_text("not an image")
    serial = ImageFolderSource(tmp_path, chunk_files=2).tasks()
    with ThreadPoolExecutor(2) as pool:
        parallel = ImageFolderSource(tmp_path, chunk_files=2).tasks(pool.map)
    assert [t.shape for t in serial] == [t.shape for t in parallel] == [(4, 5, 1)] * 4  # the first seen wins a tie
    assert [t.files for t in serial] == [t.files for t in parallel]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.bool_])
def test_statistics_partials_of_small_integers_are_exact(dtype):
    from lepton_jax.lake.fragments import _moments

    rng = np.random.default_rng(0)
    if dtype is np.bool_:
        v = rng.random(2**21 + 5) < 0.5
    else:
        info = np.iinfo(dtype)
        v = rng.integers(info.min, info.max, size=2**21 + 5, endpoint=True).astype(dtype)
        v[:2**20] = info.min if info.min < 0 else info.max  # a block of the largest squares
    m = _moments(v)
    w = v.astype(object)  # Python integers: no rounding anywhere
    assert m["sum"] == float(sum(w.tolist())) and m["sumsq"] == float(sum(x * x for x in w.tolist()))
