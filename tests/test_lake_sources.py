"""Sources (image folders, CSV time series, scikit-learn, npz), validation, cleaning, labelling, quarantine, CLI."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lepton_jax.cli import main
from lepton_jax.errors import LakeError
from lepton_jax.lake import CsvWindowSource, ImageFolderSource, Lake, NpzSource, SklearnSource, ingest, make_source


def _image_folder(root):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(root / label / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "dog" / "big.png")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    return root


def test_image_folder_quarantines_odd_shapes_and_unreadable_files_then_resizes(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    lake = Lake(tmp_path / "lake")
    first = ingest(lake, "pets", ImageFolderSource(folder), splits={"train": 0.5, "test": 0.5})
    tv = first.version
    assert tv.label_names == ["cat", "dog"] and tv.schema["arrays"]["image"]["example_shape"] == [6, 5, 1]
    assert sum(tv.num_examples(s) for s in tv.splits) == 24
    reasons = {e["id"]: e["reason"] for e in tv.quarantine()}
    assert reasons == {"cat/broken.png": "unreadable", "dog/big.png": "shape"}
    detail = {e["id"]: e["detail"] for e in tv.quarantine()}["dog/big.png"]
    assert "[9, 9, 1]" in detail and "[6, 5, 1]" in detail
    assert first.report["examples_in"] == 26 and first.report["quarantined"] == 2
    resized = ingest(lake, "pets", ImageFolderSource(folder, size=(4, 4)), splits={"train": 0.5, "test": 0.5},
                     allow_schema_change=True)
    assert resized.created and resized.version.version == 2
    assert resized.version.schema["arrays"]["image"]["example_shape"] == [4, 4, 1]
    assert {"name": "resize", "size": [4, 4], "resample": "bilinear"} in resized.version.record["lineage"]["transforms"]
    assert [e["reason"] for e in resized.version.quarantine()] == ["unreadable"]  # big.png now fits
    with pytest.raises(LakeError, match="pass allow_schema_change=True"):
        ingest(lake, "pets", ImageFolderSource(folder), splits={"train": 0.5, "test": 0.5})


def _csv(path):
    lines = ["time,device,ax,ay,label"]
    for device, labels in (("d1", ["walk"] * 10 + ["run"] * 10), ("d2", ["run"] * 8)):
        for t, lab in enumerate(labels):
            ay = "oops" if (device, t) == ("d2", 1) else f"{t * 0.5:.1f}"
            lines.append(f"{t},{device},{t + 100 * (device == 'd2')},{ay},{lab}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_time_series_is_windowed_per_series_with_bad_windows_quarantined(tmp_path):
    source = CsvWindowSource(_csv(tmp_path / "s.csv"), window=4, stride=2, series_column="device")
    data = source.load()
    # d1: 20 rows -> starts 0..16 step 2 = 9 windows, one (start 8) spans walk|run; d2: 8 rows -> 3 windows
    assert data.arrays["signal"].shape == (11, 4, 2)
    assert [r["id"] for r in data.rejected] == ["rows 10-13"] and data.rejected[0]["reason"] == "mixed_labels"
    result = ingest(Lake(tmp_path / "lake"), "har", source, splits={"train": 0.5, "test": 0.5})
    q = {e["id"]: e["reason"] for e in result.version.quarantine()}
    assert q == {"rows 10-13": "mixed_labels", "rows 22-25": "non_finite"}  # the 'oops' cell of d2
    transform = result.version.record["lineage"]["transforms"][0]
    assert (transform["name"], transform["window"], transform["stride"]) == ("window", 4, 2)
    assert result.version.label_names == ["run", "walk"]
    assert sum(result.version.num_examples(s) for s in result.version.splits) == 10


def test_csv_target_columns_give_each_window_a_target_vector(tmp_path, capsys):
    path, lake = _csv(tmp_path / "s.csv"), str(tmp_path / "lake")
    assert main(["lake", "ingest", "--lake", lake, "--table", "har", "--source", f"csv:{path}", "--window", "4",
                 "--stride", "2", "--series-column", "device", "--target-column", "ax",
                 "--splits", "train=0.5,test=0.5"]) == 0
    tv = Lake(lake).table("har")
    assert tv.schema["target_arrays"] == ["target"] and tv.schema["arrays"]["signal"]["example_shape"] == [4, 1]
    target = tv.schema["arrays"]["target"]
    assert (target["dtype"], target["example_shape"], target["columns"]) == ("float32", [1], ["ax"])
    rows = {s: tv.reader(s).read_all() for s in tv.splits}
    got = sorted(float(v) for r in rows.values() for v in r["target"][:, 0])
    # d1's kept windows start at rows 0, 2, 4, 6, 10, ..., 16 (ax = row index): mean start + 1.5; d2's 'oops' cell
    # quarantines its window at rows 1-4, leaving starts 2 and 4 (ax = 100 + row)
    assert got == [s + 1.5 for s in (0, 2, 4, 6, 10, 12, 14, 16)] + [103.5, 105.5]
    assert target["column_ranges"] == [[1.5, 105.5]]
    assert tv.record["stats"]["splits"]["train"]["target"]["columns"]["mean"]  # per-column statistics
    last = CsvWindowSource(path, window=4, stride=2, series_column="device", target_columns=["ax"],
                           target_reduce="last").load()
    assert sorted(last.arrays["target"][:, 0])[:2] == [3.0, 5.0]
    plain = CsvWindowSource(path, window=4, stride=2, series_column="device").load()
    assert plain.targets == () and plain.arrays["signal"].shape[-1] == 2  # without targets: as before
    for kwargs, message in [({"target_columns": ["speed"]}, "lacks column"),
                            ({"target_columns": ["ax"], "feature_columns": ["ax", "ay"]}, "both features and targets"),
                            ({"target_columns": ["ax"], "target_reduce": "max"}, "target_reduce")]:
        with pytest.raises(LakeError, match=message):
            CsvWindowSource(path, window=4, **kwargs).load()
    capsys.readouterr()
    assert main(["lake", "ingest", "--lake", lake, "--table", "x", "--source", "digits", "--target-key", "t"]) == 2
    assert "takes no option(s) ['target_key']" in capsys.readouterr().err


def test_npz_keys_and_target_arrays(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 1, size=(40, 3)).astype(np.float32)
    value = feats.sum(1) * 10  # a float target per example
    hot = (feats > 0.5).astype(np.float32)  # multi-hot
    np.savez(tmp_path / "d.npz", feats=feats, lab=np.arange(40) % 2, value=value, hot=hot, short=value[:5])
    lake = str(tmp_path / "lake")
    assert main(["lake", "ingest", "--lake", lake, "--table", "reg", "--source", f"npz:{tmp_path / 'd.npz'}",
                 "--feature-key", "feats", "--label-key", "lab", "--target-key", "value", "--per-column"]) == 0
    tv = Lake(lake).table("reg")
    assert tv.schema["target_arrays"] == ["target"] and tv.schema["arrays"]["target"]["example_shape"] == [1]
    assert tv.schema["arrays"]["image"]["example_shape"] == [3]
    read = np.concatenate([tv.reader(s).read_all()["target"][:, 0] for s in tv.splits])
    assert sorted(read.tolist()) == sorted(value.tolist())
    assert tv.record["stats"]["splits"]["train"]["target"]["columns"]["std"][0] > 0
    multi = ingest(Lake(lake), "multi", NpzSource(tmp_path / "d.npz", feature_key="feats", label_key="lab",
                                                  target_key="hot")).version
    assert multi.schema["arrays"]["target"]["example_shape"] == [3]
    assert multi.schema["arrays"]["target"]["column_ranges"] == [[0.0, 1.0]] * 3
    from lepton_jax.config import load_config
    from lepton_jax.tasks import make_task
    from tests.conftest import DEFAULT_CONFIG

    assert make_task(load_config(str(DEFAULT_CONFIG), ["task.name=multilabel"]), multi.schema).output_size == 3
    with pytest.raises(LakeError, match="one row per example"):
        NpzSource(tmp_path / "d.npz", feature_key="feats", label_key="lab", target_key="short").load()
    with pytest.raises(LakeError, match="lacks \\['nope'\\]"):
        NpzSource(tmp_path / "d.npz", feature_key="feats", label_key="lab", target_key="nope").load()


def test_sklearn_sets_and_source_specs(tmp_path):
    result = ingest(Lake(tmp_path), "iris", SklearnSource("iris"))
    assert result.version.schema["arrays"]["features"]["example_shape"] == [4]
    assert result.report["examples_in"] == 150 and result.report["duplicate"] == 1  # iris has one exact repeat
    assert isinstance(make_source("csv:x.csv", window=3), CsvWindowSource)
    with pytest.raises(LakeError, match="needs a window"):
        make_source("csv:x.csv")
    with pytest.raises(LakeError, match="unknown source 'bogus'"):
        make_source("bogus")
    with pytest.raises(LakeError, match="unknown scikit-learn dataset 'mnist'"):
        make_source("sklearn:mnist")


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return path


def test_cleaning_quarantines_nans_duplicates_conflicts_leaks_and_bad_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(40, 3, 3)).astype(np.float32)
    y = np.arange(40) % 2
    split = np.where(np.arange(40) < 30, "train", "test")
    x[1, 0, 0] = np.nan
    x[12] = x[10]  # duplicate, same split, same label
    x[34] = x[4]  # same content in train and test: a leak
    x[5, 1, 1] = 7.0  # outside the declared range
    x[7] = x[6]  # conflicting labels (6 -> 0, 7 -> 1): both quarantined
    y[8] = 5  # outside the label domain
    src = _npz(tmp_path / "s.npz", x, y, split=split)
    source = NpzSource(src, value_range=(0.0, 1.0), label_names=["a", "b"], split_key="split")
    lake = Lake(tmp_path / "lake")
    result = ingest(lake, "toy", source)
    reasons = {e["index"]: e["reason"] for e in result.version.quarantine()}
    assert reasons == {1: "non_finite", 12: "duplicate", 34: "leak", 5: "out_of_range", 6: "conflicting_labels",
                       7: "conflicting_labels", 8: "label_domain"}
    assert result.report["quarantined"] == 7 and result.report["examples_out"] == 33
    # quarantined examples keep their values (NaN included) for inspection
    q = result.version.quarantine_reader().read()
    row = {e["index"]: e["row"] for e in result.version.quarantine()}[1]
    assert q["source_index"][row] == 1 and np.isnan(q["image"][row]).sum() == 1
    # no example content occurs in two splits
    hashes = {s: {hashlib.sha256(im.tobytes()).hexdigest() for im in result.version.reader(s).read()["image"]}
              for s in result.version.splits}
    assert not hashes["train"] & hashes["test"]
    assert not ingest(lake, "toy", source).created and lake.versions("toy") == [1]  # re-ingest is a no-op


def test_labelling_by_label_map_and_by_function(tmp_path):
    x = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    src = _npz(tmp_path / "s.npz", x, np.arange(30) % 3)
    lake = Lake(tmp_path / "lake")
    mapped = ingest(lake, "m", NpzSource(src, label_names=["cat", "dog", "car"]),
                    label_map={"cat": "animal", "dog": "animal"}, splits={"train": 0.5, "test": 0.5})
    assert mapped.version.label_names == ["animal"]
    assert mapped.report["unlabelled"] == 10 and all("'car' is not in the label map" in e["detail"]
                                                     for e in mapped.version.quarantine())
    assert mapped.version.record["lineage"]["labeller"]["kind"] == "label_map"

    def by_mean(example, source_label):
        mean = float(example["image"].mean())
        return None if mean < 10 else ("high" if mean > 60 else "low")

    fn = ingest(lake, "f", NpzSource(src), labeller=by_mean, splits={"train": 0.5, "test": 0.5})
    assert fn.version.label_names == ["high", "low"] and fn.report["unlabelled"] == 3  # row means 1.5, 5.5, 9.5 < 10
    assert fn.version.record["lineage"]["labeller"]["name"].endswith("by_mean")


def test_mixed_shapes_bad_names_and_empty_sources_are_clear_errors(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros(4)
    np.savez(tmp_path / "ragged.npz", x=ragged, y=np.array([0, 1]))
    with pytest.raises(LakeError, match="ragged.npz.*every example must have one shape"):
        ingest(Lake(tmp_path / "lake"), "t", NpzSource(tmp_path / "ragged.npz"))
    arrays = {"train": {"a/b": np.zeros((2, 2)), "label": np.zeros(2, np.int32)}}
    with pytest.raises(LakeError, match="invalid array name 'a/b'"):
        Lake(tmp_path / "lake").commit("t", arrays, schema={}, lineage={})
    with pytest.raises(LakeError, match="invalid split name '..'"):
        Lake(tmp_path / "lake").commit("t", {"..": arrays["train"]}, schema={}, lineage={})
    with pytest.raises(LakeError, match="invalid table name 'a/b'"):
        ingest(Lake(tmp_path / "lake"), "a/b", NpzSource(_npz(tmp_path / "ok.npz", np.zeros((4, 2)), np.zeros(4,
                                                                                                           int))))
    nan_only = _npz(tmp_path / "nan.npz", np.full((4, 2), np.nan), np.zeros(4, int))
    with pytest.raises(LakeError, match=r"every example was rejected \({'non_finite': 4}\)"):
        ingest(Lake(tmp_path / "lake"), "t", NpzSource(nan_only, value_range=(0, 1)))
    assert not (tmp_path / "lake" / "t").exists()  # failed ingests write nothing


def test_zarr_python_reads_every_array_of_a_version_without_lepton(tmp_path):
    x = np.random.default_rng(2).normal(size=(50, 3, 2)).astype(np.float32)
    x[0, 0, 0] = np.nan
    src = _npz(tmp_path / "s.npz", x, np.arange(50) % 2)
    tv = ingest(Lake(tmp_path / "lake", target_shard_bytes=256), "t", NpzSource(src)).version
    frags = [f for s in tv.splits for f in tv.fragments(s)] + tv.record["quarantine"]["fragments"]
    metas = [m for f in frags for m in f["arrays"].values()]
    paths = [str(tmp_path / "lake" / "t" / m["path"]) for m in metas]
    code = ("import hashlib, json, sys, zarr\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    a = zarr.open_array(p, mode='r')[:]\n"
            "    out[p] = [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]\n"
            "assert not any(m.startswith('lepton_jax') for m in sys.modules)\n"
            "print(json.dumps(out))\n")
    out = json.loads(subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, check=True,
                                    text=True).stdout)
    readers = [tv.reader(s) for s in tv.splits] + [tv.quarantine_reader()]
    ours = {str(tmp_path / "lake" / "t" / r.fragments[0]["arrays"][n]["path"]): v
            for r in readers for n, v in r.read().items()}
    assert all(r.num_fragments == 1 for r in readers)
    assert len(ours) == len(paths) == 9  # 3 splits x (image, label) + quarantine (image, label, source_index)
    for path, value in ours.items():
        assert out[path] == [str(value.dtype), list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()]


def test_cli_ingests_new_sources_and_inspects_verifies_collects(tmp_path, capsys):
    lake = str(tmp_path / "lake")
    folder = _image_folder(tmp_path / "imgs")
    assert main(["lake", "ingest", "--lake", lake, "--table", "pets", "--source", f"images:{folder}",
                 "--resize", "5x6"]) == 0
    assert "quarantined 1 example(s)" in capsys.readouterr().out
    assert main(["lake", "ingest", "--lake", lake, "--table", "har", "--source", f"csv:{_csv(tmp_path / 's.csv')}",
                 "--window", "4", "--stride", "2", "--series-column", "device", "--splits", "train=0.5,test=0.5"]) == 0
    assert main(["lake", "log", "--lake", lake, "--table", "har"]) == 0
    assert main(["lake", "show", "--lake", lake, "--table", "pets"]) == 0
    out = capsys.readouterr().out
    assert "version 1  parent -" in out and "unreadable: Pillow cannot read cat/broken.png" in out
    assert main(["lake", "verify", "--lake", lake]) == 0 and "ok: 2 version(s) in 2 table(s)" in capsys.readouterr().out
    assert main(["lake", "gc", "--lake", lake, "--grace-seconds", "0", "--force"]) == 0
    assert "removed 0 unreferenced path(s)" in capsys.readouterr().out
    for argv, message in [(["show", "--table", "pets", "--version", "7"], "has no version 7"),
                          (["ingest", "--table", "x", "--source", "images:/nope"], "does not exist"),
                          (["ingest", "--table", "x", "--source", f"images:{folder}", "--resize", "big"], "--resize"),
                          (["verify", "--table", "../x"], "invalid table name")]:
        assert main(["lake", argv[0], "--lake", lake, *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err, (argv, err)
