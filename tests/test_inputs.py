"""Tables beyond images train end to end: CSV sensor windows with the temporal CNN, tabular features with the MLP."""

import numpy as np
import pytest

from lepton_jax.config import load_config
from lepton_jax.data.transforms import INPUT, input_array, prepare_batch
from lepton_jax.errors import ConfigError
from lepton_jax.lake import CsvWindowSource, Lake, SklearnSource, ingest
from lepton_jax.lake.synthetic import ACTIVITIES, write_activity_csv
from lepton_jax.serve import Predictor
from lepton_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    csv = write_activity_csv(root / "activity.csv", sessions=6, seconds_per_activity=10, seed=0)
    ingest(Lake(root / "lake"), "activity", CsvWindowSource(csv, window=32, series_column="session"))
    ingest(Lake(root / "lake"), "iris", SklearnSource("iris"))
    return Lake(root / "lake")


@pytest.mark.slow
def test_sensor_windows_train_a_temporal_cnn_and_serve(lake, tmp_path):
    table = lake.table("activity")
    assert input_array(table.schema) == "signal" and table.schema["arrays"]["signal"]["example_shape"] == [32, 3]
    assert sorted(table.label_names) == sorted(ACTIVITIES)
    config = load_config(ROOT / "configs" / "activity_tcn.py",
                         ["num_epochs=10", "batch_size=16", "eval_every_steps=40"])
    result = train_and_evaluate(config, tmp_path / "run", lake_root=lake.root, progress=False)
    assert result["test_accuracy"] >= 0.8  # three classes: chance is 1/3
    test = table.reader("test").read_all()
    predicted = Predictor.from_workdir(tmp_path / "run").predict(test["signal"])["class"]
    assert np.mean(predicted == test["label"]) == pytest.approx(result["test_accuracy"])


@pytest.mark.slow
def test_tabular_features_train_an_mlp(lake, tmp_path):
    table = lake.table("iris")
    batch = prepare_batch(table.reader("train").read(np.arange(4)), table.schema)
    assert batch[INPUT].shape == (4, 4) and batch[INPUT].min() >= 0.0 and batch[INPUT].max() <= 1.0
    config = load_config(ROOT / "configs" / "iris_mlp.py", ["num_epochs=30", "eval_every_steps=60"])
    result = train_and_evaluate(config, tmp_path / "run", lake_root=lake.root, progress=False)
    assert result["test_accuracy"] >= 0.85


def test_a_model_that_does_not_fit_the_table_is_a_config_error(lake, tmp_path):
    config = load_config(ROOT / "configs" / "activity_tcn.py", ["num_epochs=1", "data.table='iris'"])
    with pytest.raises(ConfigError, match="TemporalCNN takes windows of shape"):
        train_and_evaluate(config, tmp_path / "run", lake_root=lake.root, progress=False)
