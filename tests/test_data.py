import grain
import jax
import numpy as np
import pytest
from grain.experimental import index_shuffle as grain_index_shuffle
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.data import LakeDataSource, ShuffledBatches, eval_batches, pipeline, shuffle, to_global, train_dataset
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


@pytest.mark.parametrize("n, seed, rounds", [
    (1, 3, 4), (2, 9, 4), (150, 1, 4), (1257, 0, 4), (1257, 7, 6), (3000, 5, 4),  # below the 16-bit block: the
    (8000, 2, 4), (1257, 3, 8),  # table (5 doubling passes at 150 examples, none at 8000) and the walks
    (8193, 2**32 - 1, 4),  # 16-bit block, encrypted index by index
    (65537, 4, 4),  # max_index 2**16: Grain's log2 gives 16 bits, so the top index maps inside the block
    (70001, 11, 8),  # 18-bit block
])
def test_vectorised_shuffle_is_grains_index_shuffle(n, seed, rounds):
    """The vectorised permutation equals grain.experimental.index_shuffle element for element (every index for the
    small sizes; the first, last and 2000 random ones for the large), so the example order is Grain's."""
    order = shuffle.permutation(n, seed, rounds)
    picked = np.arange(n) if n <= 10_000 else np.unique(np.r_[0, n - 1,
                                                              np.random.default_rng(n).integers(0, n, 2000)])
    expected = [grain_index_shuffle(int(i), n - 1, seed, rounds) for i in picked]
    np.testing.assert_array_equal(order[picked], expected)
    np.testing.assert_array_equal(shuffle.index_shuffle(picked, n - 1, seed, rounds), expected)
    if n <= 10_000:
        assert sorted(order.tolist()) == list(range(n))


def test_large_datasets_shuffle_batch_by_batch_in_the_same_order(monkeypatch):
    """Over CACHE_LIMIT examples no epoch order is held: each batch is computed alone, with the same indices."""
    n, b, seed = 1000, 64, 9
    cached = ShuffledBatches(n, b, seed).repeat(2)
    monkeypatch.setattr(ShuffledBatches, "CACHE_LIMIT", n - 1)
    alone = ShuffledBatches(n, b, seed).repeat(2)
    for i in (0, 5, n // b, 2 * (n // b) - 1):
        np.testing.assert_array_equal(alone[i], cached[i])


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


@pytest.mark.parametrize("devices", [1, 8])
def test_placed_batches_equal_device_put(table, devices, monkeypatch):
    """One CPU device takes the jitted-identity path, eight ``device_put`` (each checked by making the other path
    fail): both give device_put's arrays and layout."""
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",)), P("data"))
    (batch,), _ = _stream(table, 1)
    expected = jax.device_put(batch, sharding)

    def other_path(*args, **kwargs):
        raise AssertionError("to_global took the other placement path")

    monkeypatch.setattr(*((jax, "device_put") if devices == 1 else (pipeline, "_placer")), other_path)
    placed = to_global(batch, sharding)
    monkeypatch.undo()
    for key in batch:
        assert placed[key].sharding == expected[key].sharding and placed[key].dtype == batch[key].dtype
        np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
        devices_of = [[s.device for s in a.addressable_shards] for a in (placed[key], expected[key])]
        assert devices_of[0] == devices_of[1]


def test_batch_larger_than_split_is_rejected(table):
    with pytest.raises(ConfigError, match="batch size 5000 exceeds the 1257 training examples"):
        train_dataset(LakeDataSource(table.reader("train")), global_batch_size=5000, seed=0, num_epochs=1,
                      schema=table.schema)


@pytest.fixture(scope="module")
def fragmented(table, tmp_path_factory):
    """The digits train split again, ingested as three shards: one logical split made of three fragments."""
    from lepton_jax.lake import NpzSource, ingest

    root = tmp_path_factory.mktemp("fragmented")
    train = table.reader("train").read()
    for k, idx in enumerate(np.array_split(np.arange(len(train["label"])), 3)):
        np.savez(root / f"part{k}.npz", x=train["image"][idx], y=train["label"][idx],
                 split=np.full(idx.size, "train"))
    source = NpzSource(root, label_names=table.label_names, value_range=(0, 16), split_key="split")
    return ingest(Lake(root / "lake"), "digits", source).version


def test_fragments_read_as_one_split_and_stream_resume_and_shard_like_one(table, fragmented):
    reader = fragmented.reader("train")
    assert reader.num_fragments == 3 and len(reader) == table.num_examples("train")
    whole = table.reader("train").read()
    idx = np.random.default_rng(0).permutation(len(reader))[:300]  # random, unsorted, crossing fragments
    got = LakeDataSource(reader).__getitems__(idx)
    assert all(np.array_equal(got[k], whole[k][idx]) for k in whole)
    assert np.array_equal(reader.read(5)["image"], whole["image"][5])
    assert all(np.array_equal(reader.read(slice(400, 900))[k], whole[k][400:900]) for k in whole)
    # the same stream as the one-fragment table, the exact resume, and the same per-host rows
    one, _ = _stream(table, 4)
    three, it = _stream(fragmented, 4)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(one, three, strict=True) for k in a)
    state = it.get_state()
    expected = [next(it)["label"] for _ in range(2)]
    _, resumed = _stream(fragmented, 0)
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["label"], want) for want in expected)
    parts = [_stream(fragmented, 1, process_index=i, process_count=2)[0][0] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["input"] for p in parts]), one[0]["input"])
