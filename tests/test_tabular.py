"""Per-column value ranges for tabular tables: recorded at ingest, applied in training, prediction, serving, export
and drift, on a table whose columns differ by orders of magnitude."""

import json

import numpy as np
import pytest

from lepton_jax.config import load_config
from lepton_jax.data.transforms import INPUT, input_bounds, prepare_batch, scale_to_unit
from lepton_jax.errors import InputError
from lepton_jax.lake import Lake, ingest
from lepton_jax.lake.sources import SourceData
from lepton_jax.serve.drift import drift_report, reference_stats

from .conftest import ROOT

COLUMNS = ["tiny", "unit", "huge"]
SCALES = np.array([1e-3, 1.0, 1e4])  # column c holds values in [0, SCALES[c]]


class TableSource:
    """A tabular source (N, 3) whose label depends only on the smallest-magnitude column; ``extra`` rows are
    added beyond the column ranges (which are those of the main rows)."""

    name = "test:tabular"

    def __init__(self, n: int = 400, seed: int = 0, extra: np.ndarray | None = None):
        rng = np.random.default_rng(seed)
        self.x = (rng.random((n, 3)) * SCALES).astype(np.float32)
        self.x[0], self.x[1] = 0, SCALES  # the declared column ranges are the data's extremes
        self.extra = extra
        self.uri = f"test://tabular/{seed}/{n}"

    def load(self) -> SourceData:
        x = self.x if self.extra is None else np.concatenate([self.x, self.extra])
        labels = (x[:, 0] > SCALES[0] / 2).astype(np.int64)
        columns = np.stack([self.x.min(0), self.x.max(0)], axis=1).astype(np.float64)
        return SourceData({"features": x}, labels, ["low", "high"], {"features": (0.0, float(x.max()))},
                          self.uri, column_ranges={"features": columns}, column_names={"features": COLUMNS})


@pytest.fixture(scope="module")
def table_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    # one extra row inside the table's overall range [0, 1e4] but outside column 'tiny''s range [0, 1e-3]
    result = ingest(Lake(root), "tab", TableSource(extra=np.array([[5.0, 0.5, 10.0]], np.float32)))
    return root, result


def test_column_ranges_recorded_and_checked_at_ingest(table_lake):
    _, result = table_lake
    spec = result.version.schema["arrays"]["features"]
    assert spec["columns"] == COLUMNS
    np.testing.assert_allclose(spec["column_ranges"], np.stack([np.zeros(3), SCALES], 1), rtol=1e-6)
    assert result.report["out_of_range"] == 1  # the row within [0, 1e4] but outside column 0's range
    entry = [e for e in result.version.quarantine() if e["reason"] == "out_of_range"][0]
    assert "column 0" in entry["detail"]
    transform = [t for t in result.version.record["lineage"]["transforms"] if t["name"] == "check_value_range"][0]
    assert transform["column_ranges"]["features"] == spec["column_ranges"]
    train = result.version.reader("train").read_all()["features"].astype(np.float64)
    stats = result.version.record["stats"]["splits"]["train"]["features"]["columns"]  # per-column statistics
    np.testing.assert_allclose(stats["mean"], train.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], train.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats["max"], train.max(0))


def test_training_inputs_scaled_per_column(table_lake):
    root, result = table_lake
    table = Lake(root).table("tab")
    x = prepare_batch(table.reader("train").read_all(), table.schema)[INPUT]
    assert x.min() >= 0 and x.max() <= 1
    assert (x.max(0) - x.min(0) > 0.9).all()  # every column spans the unit box, whatever its raw magnitude


def test_a_single_range_is_a_per_column_range_broadcast():
    """Tables without column_ranges (images, sensors, old tabular tables) scale exactly as before."""
    raw = np.random.default_rng(1).integers(0, 17, (5, 8, 8, 1)).astype(np.uint8)
    old = {"value_range": [0.0, 16.0]}
    expected = ((raw.astype(np.float32) - 0.0) / 16.0).astype(np.float32)
    np.testing.assert_array_equal(scale_to_unit(raw, old), expected)  # bit-identical to the pre-column code
    per_column = {**old, "column_ranges": [[0.0, 16.0]]}  # the same range stated per column
    np.testing.assert_array_equal(scale_to_unit(raw, per_column), expected)
    lo, hi = input_bounds({"value_range": [2, 3], "column_ranges": [[0, 1], [5, 5]]})
    np.testing.assert_array_equal(scale_to_unit(np.array([[0.5, 5.0]]), {"column_ranges": [[0, 1], [5, 5]]}),
                                  [[0.5, 0.0]])  # a constant column maps to 0
    assert lo.tolist() == [0, 5] and hi.tolist() == [1, 5]


def test_append_widens_column_ranges(tmp_path):
    lake = Lake(tmp_path)
    ingest(lake, "tab", TableSource(n=60, seed=0))
    wider = TableSource(n=60, seed=1)
    wider.x[:, 2] *= 3  # column 'huge' now reaches 3e4
    tv = ingest(lake, "tab", wider, mode="append").version
    ranges = np.asarray(tv.schema["arrays"]["features"]["column_ranges"])
    np.testing.assert_allclose(ranges[:, 1], [1e-3, 1.0, 3e4], rtol=1e-6)


@pytest.fixture(scope="module")
def tabular_run(table_lake, tmp_path_factory):
    from lepton_jax.train.loop import train

    root, _ = table_lake
    config = load_config(ROOT / "configs" / "iris_mlp.py",
                         ["data.table=tab", "num_epochs=20", "batch_size=32", "model.hidden=(32,)", "optim.lr=0.01",
                          "mesh.num_devices=2"])
    workdir = tmp_path_factory.mktemp("tabrun") / "tab"
    return workdir, train(config, workdir, lake_root=root, progress=False)


def test_mlp_learns_the_tiny_column_and_predictor_validates_per_column(tabular_run, table_lake):
    """The label depends on a column 1e7 times smaller than another: one shared range would scale it to ~1e-7."""
    from lepton_jax.serve.predictor import Predictor

    workdir, summary = tabular_run
    assert summary["test_accuracy"] >= 0.9
    predictor = Predictor.from_workdir(workdir)
    table = Lake(table_lake[0]).table("tab")
    test = table.reader("test").read_all()
    assert np.mean(predictor.predict(test["features"])["class"] == test["label"]) >= 0.9
    inside_global = np.array([[5.0, 0.5, 10.0]], np.float32)  # inside [0, 1e4], outside column 0's range
    with pytest.raises(InputError, match=r"column 0 \(tiny\) spans \[5\.0, 5\.0\]"):
        predictor.predict(inside_global)


def test_served_and_exported_models_use_the_same_per_column_transform(tabular_run, table_lake, tmp_path):
    import jax

    from lepton_jax.serve.edge import ArtifactError, EdgeModel
    from lepton_jax.serve.export import export_artifact
    from lepton_jax.serve.kserve import RequestError, decode_rows
    from lepton_jax.serve.predictor import Predictor
    from lepton_jax.serve.server import ServedModel

    workdir, _ = tabular_run
    predictor = Predictor.from_workdir(workdir)
    rows = Lake(table_lake[0]).table("tab").reader("test").read_all()["features"][:16]
    expected = predictor.predict(rows)["probability"]
    model = ServedModel.from_workdir(workdir, name="tab")
    served = model.make_replicas(1, jax.devices()[:1])[0]
    np.testing.assert_allclose(served.fn(rows), expected, atol=1e-5)

    def parse(x):
        body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.reshape(-1).tolist()}]}).encode()
        return decode_rows(body, None, None, spec=model.spec, body_limit=1 << 20, max_rows=64)[1]

    np.testing.assert_array_equal(parse(rows), rows)
    with pytest.raises(RequestError, match=r"column 0 \(tiny\)"):
        parse(np.array([[5.0, 0.5, 10.0]], np.float32))

    export_artifact(workdir, tmp_path / "edge")
    edge = EdgeModel.load(tmp_path / "edge")
    np.testing.assert_allclose(edge.predict(rows)["probability"], expected, atol=1e-5)
    with pytest.raises(ArtifactError, match="column 0"):
        edge.predict(np.array([[5.0, 0.5, 10.0]], np.float32))


def test_registry_keeps_a_per_column_drift_reference(tabular_run, tmp_path):
    from lepton_jax.serve.registry import Registry

    entry = Registry(tmp_path).register("tab", tabular_run[0])
    assert entry.reference["feature"] == "column" and list(entry.reference["groups"]) == COLUMNS
    assert entry.record["input"]["column_ranges"] == Lake(entry.record["data"]["lake"]).table("tab").schema[
        "arrays"]["features"]["column_ranges"]


def test_drift_reference_per_column():
    rng = np.random.default_rng(0)
    ranges = np.stack([np.zeros(3), SCALES], 1)
    train = rng.random((500, 3)) * SCALES
    ref = reference_stats(train, np.zeros(500, int), num_classes=2, value_range=(0, 1e4),
                          column_ranges=ranges, columns=COLUMNS)
    assert list(ref["groups"]) == COLUMNS and ref["feature"] == "column"
    assert all(max(c) < 0.25 * 500 for c in ref["groups"].values())  # each column spread over its own bins
    live = rng.random((500, 3)) * SCALES
    live[:, 0] *= 0.3  # only the tiny column shifts
    report = drift_report(ref, live, np.zeros(500, int))
    assert report["groups"]["tiny"] > 0.25
    assert report["groups"]["unit"] < 0.1 and report["groups"]["huge"] < 0.1


def test_cli_ingests_npz_features_per_column(tmp_path, capsys):
    from lepton_jax.cli import main

    x = TableSource(n=50).x
    np.savez(tmp_path / "tab.npz", x=x, y=(x[:, 0] > SCALES[0] / 2).astype(np.int64))
    lake = tmp_path / "lake"
    src = f"npz:{tmp_path / 'tab.npz'}"
    assert main(["lake", "ingest", "--lake", str(lake), "--table", "plain", "--source", src]) == 0
    assert "column_ranges" not in Lake(lake).table("plain").schema["arrays"]["image"]  # the default: one range
    assert main(["lake", "ingest", "--lake", str(lake), "--table", "tab", "--source", src, "--per-column"]) == 0
    ranges = Lake(lake).table("tab").schema["arrays"]["image"]["column_ranges"]
    np.testing.assert_allclose(ranges, np.stack([x.min(0), x.max(0)], 1), rtol=1e-6)
    capsys.readouterr()
    assert main(["lake", "ingest", "--lake", str(lake), "--table", "d", "--source", "digits", "--per-column"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per_column" in err[0]
