"""Meshes, sharding rules and the equivalence of training across meshes, devices and processes."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lepton_jax.checkpoint import Checkpointer, abstract_like
from lepton_jax.errors import CheckpointError, ConfigError
from lepton_jax.models import build_model
from lepton_jax.parallel import make_mesh
from lepton_jax.parallel.comm import collective_breakdown
from lepton_jax.parallel.mesh import mesh_config
from lepton_jax.parallel.rules import (
    PRESETS,
    logical_axes,
    named_shardings,
    param_specs,
    rules_from_config,
    state_shardings,
)
from lepton_jax.train.loop import train_and_evaluate
from lepton_jax.train.state import create_state, split_model
from lepton_jax.train.step import make_train_step
from tests.conftest import ROOT, small_config

VIT = ml_collections.ConfigDict({"name": "vit", "depth": 1, "width": 64, "num_heads": 4, "mlp_dim": 128})

# Golden PartitionSpecs of a one-block ViT (width 64, 4 heads x 16, MLP 128) on 8 devices, min_size 1024.
# Parameters not listed are replicated (biases, norms, the 640-element head, the patch kernel).
GOLDEN = {
    "dp": ({"data": -1}, {}),
    "fsdp": ({"fsdp": -1}, {
        "['blocks'][0]['attention']['query']['kernel']": ("fsdp",),
        "['blocks'][0]['attention']['key']['kernel']": ("fsdp",),
        "['blocks'][0]['attention']['value']['kernel']": ("fsdp",),
        "['blocks'][0]['attention']['out']['kernel']": (None, None, "fsdp"),
        "['blocks'][0]['mlp_in']['kernel']": ("fsdp",),
        "['blocks'][0]['mlp_out']['kernel']": ("fsdp",),
        "['position']": (None, "fsdp"),
    }),
    "fsdp_tp": ({"fsdp": 4, "tensor": 2}, {
        "['blocks'][0]['attention']['query']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['attention']['key']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['attention']['value']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['attention']['out']['kernel']": ("tensor", None, "fsdp"),
        "['blocks'][0]['mlp_in']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['mlp_out']['kernel']": ("tensor", "fsdp"),
        "['position']": (None, "fsdp"),
    }),
}


def _vit():
    model = nnx.eval_shape(lambda: build_model(VIT, input_shape=(8, 8, 1), num_classes=10, seed=0))
    return model, *split_model(model)


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_vit_partition_specs_match_golden_table(preset):
    axes, golden = GOLDEN[preset]
    model, _, params = _vit()
    mesh = make_mesh(mesh_config(axes))
    specs = param_specs(logical_axes(model), params, PRESETS[preset], mesh, min_size=1024)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    actual = {jax.tree_util.keystr(path): tuple(spec) for path, spec in flat if tuple(spec)}
    assert actual == golden


def test_fsdp_really_splits_large_kernels():
    model, _, abstract = _vit()
    mesh = make_mesh(mesh_config({"fsdp": -1}))
    shardings = named_shardings(param_specs(logical_axes(model), abstract, PRESETS["fsdp"], mesh, 1024), mesh)
    params = jax.jit(lambda: split_model(build_model(VIT, input_shape=(8, 8, 1), num_classes=10, seed=0))[1],
                     out_shardings=shardings)()
    kernel = params["blocks"][0]["mlp_in"]["kernel"]
    assert kernel.addressable_shards[0].data.nbytes == kernel.nbytes // 8
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    assert per_device < 0.25 * total  # the small replicated leaves (biases, norms, head) are the remainder
    # Adam moments follow their parameters' sharding
    tx = optax.adam(1e-3)
    opt_sh = state_shardings(jax.eval_shape(tx.init, params), shardings, mesh)
    assert opt_sh[0].mu["blocks"][0]["mlp_in"]["kernel"].spec == P("fsdp")
    assert opt_sh[0].count.spec == P()


def test_mesh_and_rule_errors():
    with pytest.raises(ConfigError, match=r"mesh.axes \{'data': 3\} needs 3 devices, but 8 are present"):
        make_mesh(mesh_config({"data": 3}))
    with pytest.raises(ConfigError, match="needs 16 devices, but 8 are present") as too_many:
        make_mesh(mesh_config({"data": 4, "tensor": 4}))
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in str(too_many.value)  # issue 28: how to get them
    with pytest.raises(ConfigError, match="XLA_FLAGS=--xla_force_host_platform_device_count=9"):
        make_mesh(mesh_config({"data": -1}, num_devices=9))
    from lepton_jax.parallel.edge import edge_mesh

    with pytest.raises(ConfigError, match="edge.nodes=12 needs 12 devices.*device_count=12"):
        edge_mesh(12)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        make_mesh(mesh_config({"data": -1, "fsdp": -1}))
    with pytest.raises(ConfigError, match=r"\(product 3\) does not divide the 8 devices"):
        make_mesh(mesh_config({"data": -1, "tensor": 3}))
    with pytest.raises(ConfigError, match="unknown sharding.rules preset 'zero3'; presets: dp, fsdp, fsdp_tp"):
        rules_from_config(ml_collections.ConfigDict({"rules": "zero3", "min_size": 0}))


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    model = build_model(ml_collections.ConfigDict({"name": "cnn", "dropout": 0.0}), input_shape=(8, 8, 1),
                        num_classes=10, seed=0)
    graphdef, params = split_model(model)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {"input": jnp.asarray(rng.uniform(size=(64, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 64), jnp.int32)}
    one, m1 = jax.jit(make_train_step(graphdef, tx, 1))(create_state(params, tx, 0), batch)
    four, m4 = jax.jit(make_train_step(graphdef, tx, 4))(create_state(params, tx, 0), batch)
    # on 8 devices, gradients accumulated unreduced per data shard and reduced once: the same step
    mesh = make_mesh(mesh_config({"data": -1}))
    data_sh = jax.sharding.NamedSharding(mesh, P("data"))
    eight, m8 = jax.jit(make_train_step(graphdef, tx, 4, mesh=mesh), in_shardings=(None, data_sh))(
        create_state(params, tx, 0), batch)
    # FSDP over 8 devices: per-device gradients over parameters gathered once, reduced into the shards once
    from lepton_jax.parallel.build import build
    from lepton_jax.parallel.rules import state_shardings
    from lepton_jax.train.edge import _schema

    config = small_config(**{"model.dropout": 0.0, "sharding.rules": "fsdp", "sharding.min_size": 0})
    fsdp_mesh = make_mesh(mesh_config({"fsdp": -1}))
    built = build(config, _schema((8, 8, 1), 10), fsdp_mesh)
    state = create_state(params, tx, 0)
    state_sh = state_shardings(jax.eval_shape(lambda s: s, state), built.shardings, fsdp_mesh)
    step = make_train_step(graphdef, tx, 4, mesh=fsdp_mesh, param_specs=built.specs)
    fsdp, m_fsdp = jax.jit(step, in_shardings=(state_sh, jax.NamedSharding(fsdp_mesh, P("fsdp"))))(state, batch)
    assert fsdp.params["hidden"]["kernel"].sharding.spec == P("fsdp")  # the update stayed sharded
    for m in (m4, m8, m_fsdp):
        np.testing.assert_allclose(float(m1["loss"]), float(m["loss"]), rtol=1e-6)
    for a, b, c, d in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), jax.tree.leaves(eight.params),
                          jax.tree.leaves(fsdp.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_reduces_gradients_once_per_step():
    """Compiled DP step, 8 devices: with grad_accum_steps=4 the gradient all-reduce runs once per step (no
    collective inside the micro-batch loop), so its bytes (loop trip counts included) equal those without
    accumulation: the parameter bytes, plus the scalar metrics."""
    from lepton_jax.train.edge import dp_step_bytes

    config = small_config(**{"model.features": "(4, 8)", "model.hidden": 16, "model.dropout": 0.0})
    shape = {"example_shape": (8, 8, 1), "num_classes": 10}
    params = split_model(build_model(config.model, input_shape=(8, 8, 1), num_classes=10, seed=0))[1]
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    one = dp_step_bytes(config, **shape, axes={"data": 8})
    config.grad_accum_steps = 4
    text = dp_step_bytes(config, **shape, axes={"data": 8}, hlo=True)
    four = collective_breakdown(text)  # (opcode, bytes x the trip counts of the loops around it)
    assert {op for op, _ in four} == {"all-reduce"}
    assert len([n for _, n in four if n >= param_bytes]) == 1  # one gradient all-reduce, not one per micro-batch
    assert 0 <= sum(n for _, n in four) - param_bytes <= 64 and 0 <= one - param_bytes <= 16  # + metric scalars


@pytest.fixture(scope="module")
def mesh_runs(lake_root, tmp_path_factory):
    """One epoch of the CNN on 1 device, 8-device DP, 8-device FSDP and FSDP x TP (4 x 2)."""
    variants = {
        "one": {"mesh.num_devices": 1},
        "dp8": {},
        "fsdp8": {"mesh.axes": "{'fsdp': -1}", "sharding.rules": "fsdp"},
        "fsdp4_tp2": {"mesh.axes": "{'fsdp': 4, 'tensor': 2}", "sharding.rules": "fsdp_tp"},
    }
    runs = {}
    for name, overrides in variants.items():
        config = small_config(num_epochs=1, **{"sharding.min_size": 0}, **overrides)
        workdir = tmp_path_factory.mktemp(name)
        runs[name] = (workdir, train_and_evaluate(config, workdir, lake_root=lake_root, progress=False))
    return runs


@pytest.mark.slow
def test_same_parameters_on_every_mesh(mesh_runs):
    """Same config, four meshes: parameters after 19 steps agree to float32 reduction-order noise."""
    reference = mesh_runs["one"][1]["final_state"].params
    hidden = mesh_runs["fsdp8"][1]["final_state"].params["hidden"]["kernel"]
    assert hidden.sharding.spec == P("fsdp")  # the FSDP run really was sharded
    for name in ("dp8", "fsdp8", "fsdp4_tp2"):
        params = mesh_runs[name][1]["final_state"].params
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_restore_fsdp_checkpoint_onto_a_two_device_data_parallel_mesh(mesh_runs):
    workdir, result = mesh_runs["fsdp8"]
    final = result["final_state"]
    mesh2 = make_mesh(mesh_config({"data": -1}, num_devices=2))
    items = {"params": final.params, "train": {"opt_state": final.opt_state, "step": final.step, "rng": final.rng}}
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    restored, _ = ckpt.restore(abstract_like(items, jax.sharding.NamedSharding(mesh2, P())))
    ckpt.close()
    leaf = restored["params"]["hidden"]["kernel"]
    assert leaf.sharding.mesh.devices.size == 2 and leaf.sharding.spec == P()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(items), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(mesh_runs):
    workdir, _ = mesh_runs["dp8"]
    other = build_model(ml_collections.ConfigDict({"name": "cnn", "hidden": 32}), input_shape=(8, 8, 1),
                        num_classes=10, seed=0)
    _, params = split_model(other)
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    with pytest.raises(CheckpointError, match="does not match the model"):
        ckpt.restore_params(abstract_like(params, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    ckpt.close()


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(mesh_runs, lake_root, tmp_path):
    workdir = tmp_path / "mp"
    cmd = [sys.executable, "-m", "lepton_jax.cli", "launch", "--num-processes", "2", "--devices-per-process", "4",
           "--", "train", "--config", str(ROOT / "configs" / "digits_cnn.py"), "--workdir", str(workdir),
           "--lake", str(lake_root), "--no-progress", "--config.num_epochs=1", "--config.sharding.min_size=0",
           "--config.mesh.axes={'data': 4}", "--config.mesh.dcn_axes={'data': 2}"]  # 4 per host x 2 hosts
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = mesh_runs["dp8"][1]["final_state"].params
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    params = ckpt.restore_params(abstract_like(reference, jax.tree.leaves(reference)[0].sharding),
                                 step=ckpt.latest_step())
    ckpt.close()
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_parameters_and_optimizer_state():
    config = ml_collections.ConfigDict({"name": "vit", "depth": 1, "dtype": "bfloat16"})
    graphdef, params = split_model(build_model(config, input_shape=(8, 8, 1), num_classes=10, seed=0))
    tx = optax.adamw(1e-3)
    state = create_state(params, tx, 0)
    batch = {"input": jnp.ones((8, 8, 8, 1)), "label": jnp.zeros((8,), jnp.int32)}
    new, metrics = jax.jit(make_train_step(graphdef, tx))(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(new.opt_state))
    assert np.isfinite(float(metrics["loss"]))
    logits = nnx.merge(graphdef, new.params)(batch["input"])
    assert logits.dtype == jnp.float32  # heads cast back for a float32 loss


@pytest.mark.parametrize("axes, rules", [({"data": 8}, "dp"), ({"fsdp": 8}, "fsdp")])
def test_gradient_accumulation_has_no_collective_inside_the_micro_batch_loop(axes, rules):
    """Issue 27: with grad_accum_steps=4, FSDP all-reduced the full gradient inside every micro-batch and data
    parallel kept two metric all-reduces in the loop. Now no collective runs inside a while body, and the step's
    collective bytes are those of one step without accumulation (FSDP: one parameter all-gather before the loop and
    one gradient reduction after it, into the shards)."""
    from lepton_jax.parallel.comm import collective_bytes, loop_collectives
    from lepton_jax.train.edge import dp_step_bytes

    config = small_config(**{"model.features": "(4, 8)", "model.hidden": 16, "model.dropout": 0.0})
    shape = {"example_shape": (8, 8, 1), "num_classes": 10}
    one = collective_bytes(dp_step_bytes(config, **shape, axes=axes, rules=rules, hlo=True))
    config.grad_accum_steps = 4
    text = dp_step_bytes(config, **shape, axes=axes, rules=rules, hlo=True)
    assert "while" in text and loop_collectives(text) == []
    assert collective_bytes(text) <= one + 64, (collective_bytes(text), one)  # not 4x: once per step


def test_loop_collectives_finds_a_collective_in_a_loop_body():
    mesh = make_mesh(mesh_config({"data": -1}))

    def f(x):
        def body(c, _):
            total = jax.lax.with_sharding_constraint((x * c).sum(0, keepdims=True), jax.NamedSharding(mesh, P()))
            return c + total, None
        return jax.lax.scan(body, jnp.ones((1, 4)), None, length=3)[0]

    from lepton_jax.parallel.comm import loop_collectives

    text = jax.jit(f, in_shardings=jax.NamedSharding(mesh, P("data"))).lower(jnp.ones((8, 4))).compile().as_text()
    assert loop_collectives(text), text[-3000:]
