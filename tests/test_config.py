import re

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
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*known keys there: b1, b2, clip_norm"):
        load_config(DEFAULT_CONFIG, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nope.x'.*no 'nope' under <top level>"):
        load_config(DEFAULT_CONFIG, ["nope.x=1"])


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"optim.lr='abc': expected float"):
        load_config(DEFAULT_CONFIG, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"num_epochs=2.5: expected int"):
        load_config(DEFAULT_CONFIG, ["num_epochs=2.5"])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a config file nor a packaged config.*digits_cnn"):
        load_config(tmp_path / "none.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load: SyntaxError"):
        load_config(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(empty)


@pytest.mark.parametrize("override, message", [
    ("mesh.axes={'dta': -1}", r"mesh.axes names \['dta'\]; axis names are data, fsdp, tensor, nodes"),
    ("batch_size=0", "batch_size must be > 0, got 0"),
    ("grad_accum_steps=0", "grad_accum_steps must be > 0, got 0"),
    ("num_epochs=-1", "num_epochs must be > 0, got -1"),
    ("batch_size=60", "batch_size 60 is not divisible by 8 data-parallel devices"),
    ("model.dropout=1.5", r"model.dropout must be in \[0, 1\), got 1.5"),
    ("model.hidden=0", "model.hidden must be a sequence of integers > 0 \\(or one\\), got 0"),
    ("mesh.num_devices=0", r"mesh.num_devices must be -1 \(all\) or > 0, got 0"),
    ("edge.outer_momentum=1.5", r"edge.outer_momentum must be in \[0, 1\), got 1.5"),
])
def test_invalid_configs_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, lake_root, override, message):
    from lepton_jax.cli import main

    workdir = tmp_path / "run"
    code = main(["train", "--config", str(DEFAULT_CONFIG), "--workdir", str(workdir), "--lake", str(lake_root),
                 "--no-progress", f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not workdir.exists()


def test_documented_optimizer_keys_are_valid_overrides():
    from lepton_jax.train.validate import validate_config

    config = load_config(DEFAULT_CONFIG, ["optim.name=sgd", "optim.momentum=0.9", "optim.nesterov=true",
                                          "optim.b1=0.8", "optim.final_lr_frac=0.1"])
    validate_config(config)
    assert config.optim.momentum == 0.9 and config.optim.nesterov is True


def test_config_file_argument_variants(tmp_path):
    path = tmp_path / "variants.py"
    path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict({'size': {'small': 1, 'big': 2}[arg or 'small']})\n")
    assert load_config(f"{path}:big").size == 2 and load_config(path).size == 1
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config(f"{DEFAULT_CONFIG.with_name('edge_diloco.py')}:big")


def test_packaged_configs_by_name_and_by_path(tmp_path, monkeypatch):
    from lepton_jax.config import packaged_configs

    by_path = load_config(DEFAULT_CONFIG, ["num_epochs=2"])
    monkeypatch.chdir(tmp_path)  # outside the checkout: names resolve inside the package
    by_name = load_config("digits_cnn", ["num_epochs=2"])
    assert by_name.to_dict() == by_path.to_dict()
    assert load_config("digits_cnn.py").num_epochs == by_path.num_epochs + 28
    assert {"digits_cnn", "iris_mlp", "robust_free"} <= set(packaged_configs())
    (tmp_path / "digits_cnn").mkdir()  # a folder of that name is not a config file: the name still resolves
    assert load_config("digits_cnn").model.name == "cnn"
    local = tmp_path / "mine.py"  # an existing file wins
    local.write_text("import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict("
                     "{'arg': arg})\n")
    assert load_config("mine.py:x").arg == "x"
    with pytest.raises(ConfigError, match="neither a config file nor a packaged config"):
        load_config("no_such_config")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric_keys(node, prefix=""):
    """Every key of a config whose value is a number or a sequence of numbers (booleans and mappings are not)."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            if name != "mesh.axes" and name != "mesh.dcn_axes":  # axis-name -> size maps have their own check
                yield from _numeric_keys(value, f"{name}.")
        elif _is_number(value) or (isinstance(value, tuple | list) and value and all(map(_is_number, value))):
            yield name


def _range_cases():
    from lepton_jax.config import base_config
    from lepton_jax.train.validate import MODEL_KEYS, NUMERIC_KEYS

    config = base_config()
    rules = {**NUMERIC_KEYS, **{f"model.{k}": r for k, r in MODEL_KEYS.items()}}
    cases = []
    for key in _numeric_keys(config):
        value = config
        for part in key.split("."):
            value = value[part]
        bads = rules[key].bad if key in rules else (None,)  # None: the test fails, naming the uncovered key
        cases += [(key, rules.get(key), bad) for bad in bads if bad is None or isinstance(bad, tuple) == isinstance(
            value, tuple)]  # a value of the key's own shape (the config would refuse a tuple for an int)
    return cases


@pytest.mark.parametrize("key, rule, bad", _range_cases())
def test_every_numeric_key_rejects_out_of_range_values_in_one_line(key, rule, bad):
    """The validation table covers every numeric key of the base config, and each value just outside a key's range
    (dropout 1.5 / -0.1, hidden 0, features (0, 64), mesh.num_devices 0 / -5, seed -1, NaN ...) is one ConfigError
    line naming the key."""
    from lepton_jax.config import base_config
    from lepton_jax.train.validate import validate_config

    assert rule is not None, f"{key} is numeric in the base config but has no range in train/validate.py"
    config = base_config()
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = bad
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    message = str(raised.value)
    assert message.startswith(f"{key} must be {rule.text}, got ") and "\n" not in message, message


def test_model_keys_of_other_models_are_checked():
    from lepton_jax.train.validate import validate_config

    config = load_config("configs/digits_vit.py", ["model.num_heads=0"])
    with pytest.raises(ConfigError, match=r"^model.num_heads must be > 0, got 0$"):
        validate_config(config)
    for name in ("digits_vit", "digits_resnet", "iris_mlp", "activity_tcn"):  # every shipped model config passes
        validate_config(load_config(f"configs/{name}.py"))
