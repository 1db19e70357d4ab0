"""Input pipelines: seeded Grain shuffles of example indices, batched reads from the lake, per-host slices of
each global batch, and assembly of global ``jax.Array``s on the mesh.

Every process shuffles the same index permutation and takes its own contiguous rows of each global batch, so the
global batch sequence is the same for any number of processes and devices, every host gets the same number of
batches, and each host reads only its share from the lake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from lepton_jax.data import shuffle
from lepton_jax.data.augment import Augment
from lepton_jax.data.source import LakeDataSource
from lepton_jax.data.transforms import prepare_batch
from lepton_jax.errors import ConfigError


def host_slice(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
    """Rows of each global batch that this process loads."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by {count} processes")
    per_host = global_batch_size // count
    return slice(index * per_host, (index + 1) * per_host)


class ShuffledBatches(grain.MapDataset):
    """Batches of example indices in the order of ``MapDataset.range(n).shuffle(seed).batch(batch_size,
    drop_remainder=True)``, reshuffled every epoch (``index // len`` is the epoch, so ``.repeat()`` works).

    The same permutation as Grain's shuffle (``grain.experimental.index_shuffle``, seed ``seed + epoch``), computed a
    whole epoch at a time by :mod:`lepton_jax.data.shuffle` (vectorised, element for element Grain's) and sliced into
    int64 batches, instead of ``batch_size`` single-element lookups and a tree stack per batch; one Python call per
    index costs more CPU than the training step of a small model (about 1.7 ms per batch of 64 on this project's
    2-core machine, where that CPU is taken from XLA). Datasets over ``CACHE_LIMIT`` examples compute each batch's
    indices alone (vectorised too) rather than hold an epoch's order in memory.
    """

    CACHE_LIMIT = 1 << 24

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        super().__init__([])
        if not 0 < batch_size <= num_examples:
            raise ConfigError(f"batch size {batch_size} must be between 1 and the {num_examples} examples")
        self._n, self._batch, self._seed = int(num_examples), int(batch_size), int(seed)
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._n // self._batch

    def __str__(self) -> str:
        return f"ShuffledBatches(n={self._n}, batch_size={self._batch}, seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, batch = divmod(int(index), len(self))
        seed, start = (self._seed + epoch) % 2**32, batch * self._batch
        if self._n > self.CACHE_LIMIT:
            return shuffle.index_shuffle(np.arange(start, start + self._batch), self._n - 1, seed)
        cached = self._epoch  # one (epoch, order) pair, replaced whole: safe for Grain's reader threads
        if cached is None or cached[0] != epoch:
            cached = self._epoch = (epoch, shuffle.permutation(self._n, seed))
        return cached[1][start:start + self._batch].copy()


def train_dataset(source: LakeDataSource, *, global_batch_size: int, seed: int, num_epochs: int | None,
                  schema: dict[str, Any], process_index: int | None = None,
                  process_count: int | None = None, read_options: grain.ReadOptions | None = None,
                  augment: Any = ()) -> grain.IterDataset:
    """Shuffled (differently each epoch), batched, preprocessed host-local batches with checkpointable state.
    ``read_options`` goes to Grain (``num_threads=0`` reads in the caller's thread, for a caller that prefetches
    in its own thread; the iterator state is the same either way). ``augment``: ``config.augment``
    (:mod:`lepton_jax.data.augment`), a seeded random map after scaling."""
    if global_batch_size > len(source):
        raise ConfigError(f"batch size {global_batch_size} exceeds the {len(source)} training examples")
    rows = host_slice(global_batch_size, process_index, process_count)
    ds = (ShuffledBatches(len(source), global_batch_size, seed)
          .repeat(num_epochs)
          .map(lambda idx: prepare_batch(source.__getitems__(idx[rows]), schema)))
    return augmented(ds, augment, rows, seed).to_iter_dataset(read_options)


def augmented(ds: grain.MapDataset, augment: Any, rows: slice, seed: int) -> grain.MapDataset:
    """``ds`` (batches) with the ``config.augment`` steps as a Grain random map seeded by ``seed``; ``ds`` itself
    when there are none."""
    fn = Augment(augment, rows)
    return ds.random_map(fn, seed=seed % 2**32) if fn else ds


def eval_batches(source: LakeDataSource, *, global_batch_size: int, schema: dict[str, Any]
                 ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """In-order host-local batches covering the whole split; the last is zero-padded. Yields (batch, n_valid)."""
    n = len(source)
    rows = host_slice(global_batch_size)
    for start in range(0, n, global_batch_size):
        idx = np.arange(start, start + global_batch_size)
        valid = int(min(global_batch_size, n - start))
        idx = np.minimum(idx, n - 1)[rows]  # pad by repeating the last example; masked out by n_valid
        yield prepare_batch(source.__getitems__(idx), schema), valid


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles host-local batch rows into global arrays split along the batch axis. With one process the local
    rows are the global batch: on one CPU device a jitted identity with ``sharding`` places them (the arrays
    ``jax.device_put`` gives, for about a sixth of its CPU time, through jit's C++ argument handling); elsewhere
    ``jax.device_put`` does (over several devices the identity program runs on each of them and costs more; on an
    accelerator it would add a device copy, unmeasured here). Measured by ``scripts/bench_place.py``."""
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    if len(sharding.device_set) == 1 and next(iter(sharding.device_set)).platform == "cpu":
        return _placer(sharding)(batch)
    return jax.device_put(batch, sharding)


@functools.lru_cache(maxsize=32)
def _placer(sharding: NamedSharding) -> Callable[[Any], Any]:
    """A jitted identity whose inputs and outputs are laid out by ``sharding`` (one per sharding: jit's own cache
    then holds one program per batch structure and shape)."""
    return jax.jit(lambda batch: batch, in_shardings=sharding, out_shardings=sharding)
