import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax.config import load_config
from lepton_jax.errors import ConfigError
from lepton_jax.train.optim import decay_mask, make_optimizer
from tests.conftest import ROOT

PARAMS = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}}
LR, WD = 0.1, 0.5


def _section(**values):
    """configs/digits_cnn.py's optim section (every key the factory reads) with ``values``."""
    optim = load_config(ROOT / "configs" / "digits_cnn.py").optim
    optim.update({"schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0, **values})
    return optim


def _optim(name, decay, **extra):
    return make_optimizer(_section(name=name, lr=LR, weight_decay=WD, decay=decay, **extra), total_steps=10)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("decay", ["coupled", "decoupled"])
def test_zero_gradient_shrinks_kernels_only(name, decay):
    tx = _optim(name, decay)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    if name == "sgd" or decay == "decoupled":
        np.testing.assert_allclose(new["dense"]["kernel"], 2.0 * (1 - LR * WD), rtol=1e-6)
    else:  # coupled decay inside Adam is rescaled by the second-moment estimate: the step is ~lr, not lr*wd*theta
        np.testing.assert_allclose(new["dense"]["kernel"], 2.0 - LR, rtol=1e-4)
    np.testing.assert_array_equal(new["dense"]["bias"], PARAMS["dense"]["bias"])


def test_coupled_sgd_matches_the_textbook_update():
    tx = _optim("sgd", "coupled")
    grads = {"dense": {"kernel": jnp.full((3, 4), 0.3), "bias": jnp.full((4,), 0.3)}}
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 - LR * 0.3 - LR * WD * 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["bias"], 2.0 - LR * 0.3, rtol=1e-6)


def test_adam_coupled_and_decoupled_differ_as_theory_says():
    grads = {"dense": {"kernel": jnp.full((3, 4), 0.3), "bias": jnp.full((4,), 0.3)}}
    out = {}
    for decay in ("coupled", "decoupled"):
        tx = _optim("adamw", decay, b1=0.0, b2=0.0)
        updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
        out[decay] = optax.apply_updates(PARAMS, updates)["dense"]["kernel"]
    # decoupled: theta - lr*sign-like(g) - lr*wd*theta; coupled: the decay joins g before normalisation
    np.testing.assert_allclose(out["decoupled"], 2.0 - LR * 1.0 - LR * WD * 2.0, rtol=1e-4)
    np.testing.assert_allclose(out["coupled"], 2.0 - LR * 1.0, rtol=1e-4)


def test_unknown_optimizer_and_schedule_are_config_errors():
    with pytest.raises(ConfigError, match="unknown optim.name 'lamb'"):
        _optim("lamb", "decoupled")
    with pytest.raises(ConfigError, match="unknown optim.decay 'both'"):
        _optim("sgd", "both")
    with pytest.raises(ConfigError, match="unknown optim.schedule 'step'"):
        _optim("sgd", "coupled", schedule="step")


def test_decay_mask_spares_biases_norms_and_position_embeddings_of_a_vit():
    from flax import nnx

    from lepton_jax.models import build_model
    from lepton_jax.models.functional import split_model

    config = load_config(ROOT / "configs" / "digits_vit.py")
    model = nnx.eval_shape(lambda: build_model(config.model, input_shape=(8, 8, 1), num_classes=10, seed=0))
    mask = jax.tree_util.tree_flatten_with_path(decay_mask(split_model(model)[1]))[0]
    decayed = {jax.tree_util.keystr(p) for p, m in mask if m}
    spared = {jax.tree_util.keystr(p) for p, m in mask if not m}
    assert decayed and all(k.endswith("['kernel']") for k in decayed)
    assert "['position']" in spared
    # attention biases have rank 2 ((heads, head_dim)): a rank rule would decay them
    assert "['blocks'][0]['attention']['query']['bias']" in spared
    assert all(("bias" in k or "scale" in k or k == "['position']") for k in spared)


def test_sgd_momentum_and_nesterov_are_config_keys():
    tx = make_optimizer(_section(name="sgd", lr=LR, weight_decay=0.0, momentum=0.9, nesterov=True), total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)
    state = tx.init(PARAMS)
    _, state = tx.update(grads, state, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)  # Nesterov: g + 0.9 * (0.9 * g + g)
    np.testing.assert_allclose(updates["dense"]["bias"], -LR * 0.3 * (1 + 0.9 * 1.9), rtol=1e-6)


GROUPED = {"body": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
           "neck": {"kernel": jnp.full((4, 4), 2.0)}, "head": {"kernel": jnp.full((4, 2), 2.0)}}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("decay", ["coupled", "decoupled"])
def test_frozen_parameters_stay_bit_identical_and_groups_scale_the_learning_rate(name, decay):
    tx = _optim(name, decay, freeze=("body/.*",), lr_multipliers=(("neck/.*", 0.5),), clip_norm=1.0, momentum=0.9)
    params, state = GROUPED, tx.init(GROUPED)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 10, jnp.float32), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    for leaf in ("kernel", "bias"):  # weight decay and momentum included: not one bit moves
        assert np.asarray(params["body"][leaf]).tobytes() == np.asarray(GROUPED["body"][leaf]).tobytes()
    assert not np.array_equal(params["neck"]["kernel"], GROUPED["neck"]["kernel"])


def test_lr_multiplier_scales_the_whole_update_and_clipping_ignores_frozen_gradients():
    tx = _optim("sgd", "decoupled", freeze=("body/.*",), lr_multipliers=(("neck/.*", 0.5),), clip_norm=1.0)
    grads = {"body": {"kernel": jnp.full((3, 4), 100.0), "bias": jnp.full((4,), 100.0)},
             "neck": {"kernel": jnp.full((4, 4), 0.01)}, "head": {"kernel": jnp.full((4, 2), 0.01)}}
    updates, _ = tx.update(grads, tx.init(GROUPED), GROUPED)
    # the frozen gradients (norm 346) would scale the others by 1/346 if clipping counted them; here it is off
    np.testing.assert_allclose(updates["head"]["kernel"], -LR * (0.01 + WD * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["neck"]["kernel"], -0.5 * LR * (0.01 + WD * 2.0), rtol=1e-6)
    np.testing.assert_array_equal(updates["body"]["kernel"], 0.0)
