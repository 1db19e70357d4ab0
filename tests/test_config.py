import pytest

from lepton_jax.config import load_config, split_override_args
from lepton_jax.errors import ConfigError
from tests.conftest import DEFAULT_CONFIG


def test_overrides_are_typed_and_applied():
    config = load_config(DEFAULT_CONFIG, ["optim.lr=1", "model.features=(8,16)", "optim.name=sgd",
                                          "model.dropout=0"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)  # int widened to the field's float
    assert tuple(config.model.features) == (8, 16)
    assert config.optim.name == "sgd"
    assert config.model.dropout == 0.0


def test_split_override_args_accepts_both_forms():
    rest, overrides = split_override_args(["train", "--config.optim.lr=3e-4", "--config.seed", "7", "--workdir", "w"])
    assert rest == ["train", "--workdir", "w"]
    assert overrides == ["optim.lr=3e-4", "seed=7"]


def test_unknown_key_names_key_and_known_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*known keys there: clip_norm, decay, lr"):
        load_config(DEFAULT_CONFIG, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nope.x'.*no 'nope' under <top level>"):
        load_config(DEFAULT_CONFIG, ["nope.x=1"])


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"optim.lr='abc': expected float"):
        load_config(DEFAULT_CONFIG, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"num_epochs=2.5: expected int"):
        load_config(DEFAULT_CONFIG, ["num_epochs=2.5"])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load: SyntaxError"):
        load_config(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(empty)
