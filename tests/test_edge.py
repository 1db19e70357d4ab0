"""Edge training (local SGD / DiLoCo over a `nodes` axis): equivalences, the outer update, communication bytes,
multi-process agreement and exact resume."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lepton_jax import tracking
from lepton_jax.checkpoint import Checkpointer, abstract_like
from lepton_jax.config import load_config
from lepton_jax.errors import ConfigError
from lepton_jax.models import build_model
from lepton_jax.parallel import edge as edge_math
from lepton_jax.parallel.comm import collective_breakdown, collective_bytes, wire_breakdown
from lepton_jax.train.edge import EdgeStrategy, _schema, dp_step_bytes, make_grad_fn, node_partitions
from lepton_jax.train.loop import train
from lepton_jax.train.state import create_state, split_model
from lepton_jax.train.step import make_train_step
from lepton_jax.train.validate import validate_config
from tests.conftest import ROOT

EDGE_CONFIG = ROOT / "configs" / "edge_diloco.py"
TINY = {"model.features": "(4, 8)", "model.hidden": 16, "model.dropout": 0.0}
RUN = {**TINY, "model.dropout": 0.25, "num_epochs": 1, "batch_size": 64, "edge.sync_every": 4,
       "eval_every_steps": 6, "log_every_steps": 5, "edge.delta_dtype": "bfloat16"}


def _config(**overrides):
    return load_config(EDGE_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def _tiny_model():
    model = build_model(ml_collections.ConfigDict({"name": "cnn", "features": (4, 8), "hidden": 16,
                                                   "dropout": 0.0}), input_shape=(8, 8, 1), num_classes=10, seed=0)
    return split_model(model)


@pytest.mark.slow
def test_h1_local_sgd_with_outer_lr_1_equals_data_parallel():
    """H = 1, inner SGD, outer SGD(lr 1): every step averages the nodes' SGD steps, i.e. one SGD step on the mean
    gradient of the global batch."""
    graphdef, params = _tiny_model()
    mesh = edge_math.edge_mesh(4)
    inner_tx, outer_tx = optax.sgd(0.2), edge_math.outer_optimizer(1.0, 0.0)
    state = edge_math.init_state(params, inner_tx, outer_tx, 4, seed=0)
    inner = jax.jit(edge_math.make_inner_step(make_grad_fn(graphdef), inner_tx, mesh))
    sync = jax.jit(edge_math.make_sync(outer_tx, mesh))
    dp_step = jax.jit(make_train_step(graphdef, inner_tx))
    dp = create_state(params, inner_tx, 0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"input": jnp.asarray(rng.uniform(size=(32, 8, 8, 1)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, 10, 32), jnp.int32)}
        state, metrics = inner(state, batch)
        state = sync(state)
        dp, dp_metrics = dp_step(dp, batch)
        np.testing.assert_allclose(float(np.mean(metrics["loss"])), float(dp_metrics["loss"]), rtol=1e-5)
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dp.params),
                                                             strict=True))
    assert moved > 1e-3  # training really changed the parameters
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(dp.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.node_params), jax.tree.leaves(dp.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.broadcast_to(np.asarray(b), a.shape), rtol=1e-5, atol=1e-6)


def test_outer_nesterov_update_on_fragments_matches_numpy_reference():
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32),
              "c": rng.normal(size=(3, 3)).astype(np.float32)}
    nodes, lr, mu, fragments = 4, 0.7, 0.9, 2
    groups = edge_math.fragment_leaves(params, fragments)
    assert sorted(i for g in groups for i in g) == [0, 1, 2] and all(groups)
    mesh = edge_math.edge_mesh(nodes)
    outer_tx = edge_math.outer_optimizer(lr, mu)
    state = edge_math.init_state(jax.tree.map(jnp.asarray, params), optax.sgd(0.1), outer_tx, nodes, seed=0)
    syncs = [jax.jit(edge_math.make_sync(outer_tx, mesh, g)) for g in groups]
    theta = [np.array(x) for x in jax.tree.leaves(params)]
    local = [np.broadcast_to(x, (nodes, *x.shape)).copy() for x in theta]
    momentum = [np.zeros_like(x) for x in theta]
    for k in range(5):
        local = [x + rng.normal(scale=0.1, size=x.shape).astype(np.float32) for x in local]  # "inner training"
        state = state.replace(node_params=jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x)
                                                                                           for x in local]))
        state = syncs[edge_math.fragment_for_sync(k, fragments)](state)
        for i in groups[k % fragments]:  # Nesterov SGD on the mean delta, then every node takes the result
            delta = theta[i] - local[i].mean(0)
            momentum[i] = mu * momentum[i] + delta
            theta[i] = theta[i] - lr * (delta + mu * momentum[i])
            local[i] = np.broadcast_to(theta[i], local[i].shape).copy()
        for i, (got, got_local) in enumerate(zip(jax.tree.leaves(state.params), jax.tree.leaves(state.node_params),
                                                 strict=True)):
            np.testing.assert_allclose(np.asarray(got), theta[i], rtol=1e-5, atol=1e-6, err_msg=f"sync {k} leaf {i}")
            np.testing.assert_allclose(np.asarray(got_local), local[i], rtol=1e-5, atol=1e-6)


def test_low_precision_deltas_keep_the_rounding_error_for_the_next_sync():
    params = {"w": jnp.zeros((16,), jnp.float32)}
    mesh = edge_math.edge_mesh(2)
    outer_tx = edge_math.outer_optimizer(1.0, 0.0)
    for dtype, tol in (("bfloat16", 1e-2), ("int8", 2e-2)):
        state = edge_math.init_state(params, optax.sgd(0.1), outer_tx, 2, seed=0)
        local = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16)), jnp.float32)
        state = jax.jit(edge_math.make_sync(outer_tx, mesh, delta_dtype=dtype))(state.replace(
            node_params={"w": local}))
        exact = np.asarray(local).mean(0)
        got, error = np.asarray(state.params["w"]), np.asarray(state.error["w"])
        assert 0 < np.abs(got - exact).max() < tol * np.abs(exact).max()  # rounded, but close
        delta = -np.asarray(local)  # what each node meant to send (outer 0 minus its parameters)
        assert np.abs(error).max() > 0
        if dtype == "bfloat16":  # the residual is exactly what bfloat16 rounding dropped
            rounded = np.asarray(jnp.asarray(delta).astype(jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(error, delta - rounded)
        else:  # int8 is dequantized before averaging, so the applied mean is exactly that of (delta - residual)
            np.testing.assert_allclose(-got, (delta - error).mean(0), rtol=1e-5, atol=1e-6)


def test_partial_participation_averages_over_the_nodes_that_join_and_the_others_keep_their_parameters():
    """A sync with participation weights: the outer step uses the mean delta of the joining nodes only, they take
    the new outer parameters, a node that misses keeps its own parameters (and its bf16 residual); with nobody
    joining nothing changes; all nodes joining is the ordinary sync."""
    rng = np.random.default_rng(3)
    nodes, lr, mu = 4, 0.7, 0.9
    params = {"a": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    mesh = edge_math.edge_mesh(nodes)
    outer_tx = edge_math.outer_optimizer(lr, mu)
    local = {k: (v + rng.normal(scale=0.1, size=(nodes, *v.shape))).astype(np.float32) for k, v in params.items()}
    state = edge_math.init_state(jax.tree.map(jnp.asarray, params), optax.sgd(0.1), outer_tx, nodes, seed=0)
    state = state.replace(node_params=jax.tree.map(jnp.asarray, local))
    mask = np.array([1, 0, 1, 0], np.float32)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        sync = jax.jit(edge_math.make_sync(outer_tx, mesh, delta_dtype=dtype, weights=lambda step: jnp.asarray(mask)))
        out = sync(state)
        for k in params:
            delta = params[k] - local[k][mask > 0].mean(0)  # first outer Nesterov step: theta - lr (1 + mu) delta
            expected = params[k] - lr * (1 + mu) * delta
            np.testing.assert_allclose(np.asarray(out.params[k]), expected, rtol=tol, atol=tol)
            got_local = np.asarray(out.node_params[k])
            for n in range(nodes):
                if mask[n]:
                    np.testing.assert_array_equal(got_local[n], np.asarray(out.params[k]))
                else:  # missed the round: untouched parameters and residual
                    np.testing.assert_array_equal(got_local[n], local[k][n])
                    assert not np.asarray(out.error[k])[n].any()
            if dtype == "bfloat16":
                assert np.asarray(out.error[k])[mask > 0].any()
    nobody = jax.jit(edge_math.make_sync(outer_tx, mesh, weights=lambda step: jnp.zeros((nodes,))))(state)
    for k in params:
        np.testing.assert_array_equal(np.asarray(nobody.params[k]), params[k])
        np.testing.assert_array_equal(np.asarray(nobody.node_params[k]), local[k])
    everyone = jax.jit(edge_math.make_sync(outer_tx, mesh, weights=lambda step: jnp.ones((nodes,))))(state)
    plain = jax.jit(edge_math.make_sync(outer_tx, mesh))(state)
    for a, b in zip(jax.tree.leaves(everyone), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_participation_is_a_deterministic_draw_per_seed_and_round():
    draw = jax.jit(edge_math.participants, static_argnums=(0, 2, 3))
    rounds = np.stack([np.asarray(draw(7, r, 4, 0.3)) for r in range(200)])
    np.testing.assert_array_equal(rounds, np.stack([np.asarray(draw(7, r, 4, 0.3)) for r in range(200)]))
    assert set(np.unique(rounds)) == {0.0, 1.0}
    assert 0.6 < rounds.mean() < 0.8  # each node joins with probability 0.7
    assert len({tuple(r) for r in rounds}) > 4  # the draw changes with the round
    assert not np.array_equal(rounds, np.stack([np.asarray(draw(8, r, 4, 0.3)) for r in range(200)]))
    assert np.asarray(draw(7, 3, 4, 0.0)).tolist() == [1.0] * 4
    with pytest.raises(ConfigError, match="skip_prob"):
        validate_config(_config(**{"edge.skip_prob": 1.0}))


HLO = """
HloModule m
%body (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
}
ENTRY %main (a: f32[10,3], b: bf16[8], c: s8[2,2]) -> f32[10,3] {
  %a = f32[10,3]{1,0} parameter(0)
  %b = bf16[8]{0} parameter(1)
  %c = s8[2,2]{1,0} parameter(2)
  %ars = (f32[10,3]{1,0}, bf16[8]{0}) all-reduce-start(%a, %b), channel_id=1, to_apply=%add
  %ard = (f32[10,3]{1,0}, bf16[8]{0}) all-reduce-done(%ars)
  %ag = s8[8,2]{1,0} all-gather(%c), dimensions={0}
  %cp = f32[4]{0} collective-permute(%p), source_target_pairs={{0,1}}
  %rs = bf16[2]{0} reduce-scatter(%b), dimensions={0}
  ROOT %add.1 = f32[10,3]{1,0} add(%a, %a)
}
"""


def test_hlo_collective_bytes_count_operands_once():
    assert collective_breakdown(HLO) == [("all-reduce", 120 + 16), ("all-gather", 4), ("collective-permute", 16),
                                         ("reduce-scatter", 16)]
    assert collective_bytes(HLO) == 136 + 4 + 16 + 16


def test_collectives_inside_loops_count_once_per_iteration():
    """A hand-counted program: an all-reduce of a (3, 5) float32 gradient inside a 4-step scan (4 x 60 bytes), a
    (2,) all-reduce inside a nested 3 x 2 loop (6 x 8 bytes) and one scalar all-reduce outside (4 bytes)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))

    def f(w, x, v):
        def body(c, xi):
            return c + jax.grad(lambda w: jnp.sum((xi @ w) ** 2))(w), None

        out, _ = jax.lax.scan(body, jnp.zeros_like(w), x)

        def inner(c, _):
            return c + jnp.sum(v * c[0], axis=0), None  # depends on the carry, so it stays inside the loops

        def outer(c, _):
            return jax.lax.scan(inner, c, None, length=2)[0], None

        nested = jax.lax.scan(outer, jnp.ones(2), None, length=3)[0]
        return out, nested, jnp.sum(v)

    shard = NamedSharding(mesh, P(None, "data"))
    args = (jax.ShapeDtypeStruct((3, 5), jnp.float32, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((4, 8, 3), jnp.float32, sharding=shard),
            jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh, P("data"))))
    text = jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(*args).compile().as_text()
    assert sorted(n for op, n in collective_breakdown(text) if op == "all-reduce") == sorted([4 * 60, 6 * 8, 4])


@pytest.fixture(scope="module")
def programs():
    """The tiny CNN's edge programs (H = 4) with float32 and bfloat16 deltas, and its data-parallel step bytes."""
    config = _config(**TINY, batch_size=16, **{"edge.sync_every": 4})
    shape = {"example_shape": (8, 8, 1), "num_classes": 10}
    f32 = EdgeStrategy(config, _schema((8, 8, 1), 10), None, total_steps=8)
    config_bf16 = _config(**TINY, batch_size=16, **{"edge.sync_every": 4, "edge.delta_dtype": "bfloat16"})
    bf16 = EdgeStrategy(config_bf16, _schema((8, 8, 1), 10), None, total_steps=8)
    return f32, bf16, dp_step_bytes(config, **shape, axes={"data": 4})


def test_communication_bytes(programs):
    f32, bf16, dp = programs
    params = f32.param_bytes
    assert params == sum(x.nbytes for x in jax.tree.leaves(_tiny_model()[1]))
    assert 0 <= dp - params <= 8  # the gradient all-reduce, plus the loss and accuracy scalars (4 bytes each)
    assert f32.inner_bytes == 0 and bf16.inner_bytes == 0  # no collectives in the inner step
    assert f32.sync_bytes == [params]
    assert bf16.sync_bytes == [params // 2]
    h = f32.edge.sync_every
    diloco_over_h = f32.bytes_through(h, total_steps=100)
    assert diloco_over_h == params
    assert dp * h / diloco_over_h == pytest.approx(h, rel=1e-3)
    # on the wire (ring model, 4 nodes): the float32 all-reduce sends 2*3/4 of the parameters, the bfloat16
    # all-gather 3 x half of them: the same link bytes for half the payload
    assert f32.sync_wire == [params * 3 // 2]
    assert bf16.sync_wire == [params * 3 // 2]
    assert bf16.bytes_through(h, total_steps=100, wire=True) == f32.bytes_through(h, total_steps=100, wire=True)
    assert dp_step_bytes(f32.config, example_shape=(8, 8, 1), num_classes=10, axes={"data": 4}, wire=True) == \
        pytest.approx(1.5 * dp, abs=12)


def test_ring_wire_bytes_from_group_sizes():
    text = HLO.replace("channel_id=1,", "channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}},").replace(
        "dimensions={0}\n", "dimensions={0}, replica_groups=[2,4]<=[8]\n", 1)
    rows = {r["opcode"]: r for r in wire_breakdown(text)}
    assert rows["all-reduce"]["group_size"] == 4 and rows["all-gather"]["group_size"] == 4
    assert rows["all-reduce"]["ring_wire_bytes"] == 2 * 3 / 4 * (120 + 16)
    assert rows["all-gather"]["ring_wire_bytes"] == 3 * 4  # s8[2,2] shard sent to 3 others
    assert rows["collective-permute"]["group_size"] == 2 and rows["collective-permute"]["ring_wire_bytes"] == 16
    assert rows["reduce-scatter"]["group_size"] is None and rows["reduce-scatter"]["ring_wire_bytes"] == 16
    mesh_form = "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0','axis_2'}"
    assert wire_breakdown(HLO.replace("channel_id=1,", f"channel_id=1, {mesh_form},"))[0]["group_size"] == 4


def test_node_partitions_iid_and_by_label():
    labels = np.repeat(np.arange(10), 20)
    iid = node_partitions(200, 4, "iid", seed=0)
    assert iid.shape == (4, 50) and len(np.unique(iid)) == 200
    by_label = node_partitions(200, 4, "label", seed=0, labels=labels)
    assert len(np.unique(by_label)) == 200
    assert max(len(np.unique(labels[row])) for row in by_label) <= 3  # each node sees 2-3 classes
    assert min(len(np.unique(labels[row])) for row in iid) == 10


@pytest.fixture(scope="module")
def reference_run(lake_root, tmp_path_factory):
    """19 steps on 4 nodes, H = 4, bf16 deltas (error feedback), dropout, a checkpoint every 6 steps."""
    workdir = tmp_path_factory.mktemp("edge_ref")
    return workdir, train(_config(**RUN), workdir, lake_root=lake_root, progress=False)


def _dev_records(workdir):
    return [(r["step"], r["dev_accuracy"], r["dev_loss"]) for r in tracking.read_metrics(workdir)
            if "dev_accuracy" in r]


def test_resume_between_syncs_is_exact(reference_run, lake_root, tmp_path):
    ref_dir, reference = reference_run
    assert reference["steps"] == 19 and reference["test_accuracy"] > 0.2
    program = reference["program"]  # the same compiled programs (compiling again would only cost time)
    stopped = train(_config(**RUN), tmp_path, lake_root=lake_root, progress=False, stop_after_step=10,
                    strategy=program)
    assert stopped["preempted"] and stopped["steps"] == 10  # between the syncs after steps 8 and 12
    resumed = train(_config(**RUN), tmp_path, lake_root=lake_root, progress=False, strategy=program)
    assert any(r.get("resumed_from_step") == 10 for r in tracking.read_metrics(tmp_path))
    for a, b in zip(jax.tree.leaves(program.items(resumed["final_state"])),
                    jax.tree.leaves(program.items(reference["final_state"])), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert [r for r in _dev_records(tmp_path) if r[0] != 10] == _dev_records(ref_dir)
    # the nodes really diverged between syncs: after the final full sync they agree, at step 10 they did not
    local = np.asarray(stopped["final_state"].node_params["hidden"]["kernel"])
    assert np.abs(local[0] - local[1]).max() > 1e-4


def test_eval_and_predict_restore_the_outer_parameters(reference_run):
    from lepton_jax.serve import Predictor

    workdir, reference = reference_run
    predictor = Predictor.from_workdir(workdir)
    for a, b in zip(jax.tree.leaves(predictor.params), jax.tree.leaves(reference["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_two_processes_agree_with_one(reference_run, lake_root, tmp_path):
    _, reference = reference_run
    cmd = [sys.executable, "-m", "lepton_jax.cli", "launch", "--num-processes", "2", "--devices-per-process", "2",
           "--", "train", "--config", str(EDGE_CONFIG), "--workdir", str(tmp_path), "--lake", str(lake_root),
           "--no-progress", *[f"--config.{k}={v}" for k, v in RUN.items()]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = reference["program"].items(reference["final_state"])
    ckpt = Checkpointer(tmp_path / "checkpoints", create=False)
    state, _ = ckpt.restore(abstract_like(final, jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                            step=ckpt.latest_step())
    ckpt.close()
    assert int(state["edge"]["step"]) == 19
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
