"""Every config file loads, validates and builds its model abstractly (jax.eval_shape: no parameters allocated)."""

import jax
import pytest

from lepton_jax.config import load_config
from lepton_jax.models.functional import make_predict
from lepton_jax.parallel import make_mesh
from lepton_jax.parallel.build import build
from lepton_jax.train.validate import validate_config
from tests.conftest import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))
# input shape and classes of each table the configs train on (the lake schema supplies them in a real run)
TABLES = {"digits": ((8, 8, 1), 10), "iris": ((4,), 3), "activity": ((32, 3), 4), "wine": ((13,), 3),
          "breast_cancer": ((30,), 2), "diabetes": ((10,), 1), "activity_speed": ((64, 3), 1),
          "digits_attributes": ((8, 8, 1), 3), "digits_strokes": ((8, 8, 1), (8, 8, 2))}


def _schema(table):
    shape, classes = TABLES[table]
    if table in ("diabetes", "activity_speed"):  # regression: one float target (its train-split statistics come
        # with the run's schema)
        return {"label_array": "label", "label_names": ["q1", "q2", "q3", "q4"], "target_arrays": ["target"],
                "arrays": {"input": {"example_shape": list(shape)}, "target": {"example_shape": [1]}},
                "target_stats": {"array": "target", "mean": [150.0], "std": [77.0]}}
    if table == "digits_strokes":  # dense targets: a per-pixel class map with classes 0..1
        return {"label_array": "label", "label_names": [str(i) for i in range(10)], "target_arrays": ["target"],
                "arrays": {"input": {"example_shape": list(shape)},
                           "target": {"example_shape": [8, 8], "value_range": [0.0, 1.0]}}}
    if table == "digits_attributes":  # multi-label: a multi-hot target of 3 labels
        return {"label_array": "label", "label_names": [str(i) for i in range(10)], "target_arrays": ["target"],
                "arrays": {"input": {"example_shape": list(shape)}, "target": {"example_shape": [classes]}}}
    return {"label_array": "label", "label_names": [str(i) for i in range(classes)],
            "arrays": {"input": {"example_shape": list(shape)}}}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_builds(name):
    config = load_config(ROOT / "configs" / name)
    validate_config(config)
    mesh = make_mesh(config.mesh) if config.edge.nodes <= 1 else None
    if mesh is None:  # edge configs: one node per device
        from lepton_jax.parallel.edge import edge_mesh

        mesh = edge_mesh(config.edge.nodes)
    built = build(config, _schema(config.data.table), mesh)
    assert built.num_params > 0
    x = jax.ShapeDtypeStruct((2, *TABLES[config.data.table][0]), "float32")
    logits = jax.eval_shape(make_predict(built.graphdef), built.abstract_params, x)
    out = TABLES[config.data.table][1]
    assert logits.shape == (2, *(out if isinstance(out, tuple) else (out,)))


def test_every_config_has_every_base_key():
    base = load_config(ROOT / "configs" / "digits_cnn.py")

    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            if k == "model":  # each model has its own keyword arguments
                continue
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") and not isinstance(v, dict) else {prefix + k}
        return out

    for name in CONFIGS:
        assert keys(base) <= keys(load_config(ROOT / "configs" / name)), name
