import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.data import LakeDataSource, ShuffledBatches, eval_batches, to_global, train_dataset
from lepton_jax.errors import ConfigError
from lepton_jax.lake import Lake


@pytest.fixture(scope="module")
def table(lake_root):
    return Lake(lake_root).table("digits")


def _stream(table, n, **kwargs):
    ds = train_dataset(LakeDataSource(table.reader("train")), global_batch_size=32, seed=1, num_epochs=2,
                       schema=table.schema, **kwargs)
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_batches_are_preprocessed_and_epochs_reshuffle(table):
    steps_per_epoch = table.num_examples("train") // 32
    batches, _ = _stream(table, 2 * steps_per_epoch)
    first = batches[0]
    assert first["input"].shape == (32, 8, 8, 1) and first["input"].dtype == np.float32
    assert first["label"].dtype == np.int32
    assert first["input"].min() >= 0.0 and first["input"].max() <= 1.0
    epoch1 = np.concatenate([b["label"] for b in batches[:steps_per_epoch]])
    epoch2 = np.concatenate([b["label"] for b in batches[steps_per_epoch:]])
    assert not np.array_equal(epoch1, epoch2)
    # within an epoch no example repeats: the images of one epoch are distinct rows of the split
    images = np.concatenate([b["input"] for b in batches[:steps_per_epoch]]).reshape(-1, 64)
    assert len({row.tobytes() for row in images}) == len(images)


def test_index_batches_follow_grains_shuffle_across_epochs():
    """ShuffledBatches is a faster path to exactly the stream of range(n).shuffle(seed).batch(b).repeat()."""
    n, b, seed = 103, 8, 5
    reference = grain.MapDataset.range(n).shuffle(seed=seed).batch(b, drop_remainder=True).repeat(3)
    ours = ShuffledBatches(n, b, seed).repeat(3)
    assert len(ours) == len(reference) == 3 * (n // b)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], np.asarray(reference[i]))
    assert ours[0].dtype == np.int64
    assert not np.array_equal(ours[0], ours[n // b])  # the next epoch is a different permutation
    with pytest.raises(ConfigError, match="batch size 0"):
        ShuffledBatches(n, 0, seed)


def test_hosts_get_disjoint_slices_of_the_same_global_batch(table):
    (whole,), _ = _stream(table, 1)
    parts = [_stream(table, 1, process_index=i, process_count=4)[0][0] for i in range(4)]
    assert all(p["input"].shape[0] == 8 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["input"] for p in parts]), whole["input"])


def test_iterator_state_resumes_the_exact_stream(table):
    batches, it = _stream(table, 5)
    state = it.get_state()
    expected = [next(it)["label"] for _ in range(3)]
    _, resumed = _stream(table, 0)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["label"], want)


def test_eval_batches_cover_the_split_in_order(table):
    source = LakeDataSource(table.reader("dev"))
    labels = [b["label"][:n] for b, n in eval_batches(source, global_batch_size=64, schema=table.schema)]
    np.testing.assert_array_equal(np.concatenate(labels), table.reader("dev").read()["label"])


def test_global_arrays_are_sharded_over_the_mesh(table):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    (batch,), _ = _stream(table, 1)
    arrays = to_global(batch, NamedSharding(mesh, P("data")))
    assert arrays["input"].shape == (32, 8, 8, 1)
    assert len(arrays["input"].addressable_shards) == 8
    assert arrays["input"].addressable_shards[0].data.shape == (4, 8, 8, 1)


def test_batch_larger_than_split_is_rejected(table):
    with pytest.raises(ConfigError, match="batch size 5000 exceeds the 1257 training examples"):
        train_dataset(LakeDataSource(table.reader("train")), global_batch_size=5000, seed=0, num_epochs=1,
                      schema=table.schema)
