"""A Grain random-access data source over one split of a pinned lake table version."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lepton_jax.lake.store import SplitReader


class LakeDataSource:
    """Implements Grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``) plus a batched
    ``__getitems__`` that reads many indices with one TensorStore request per array. Picklable: TensorStore
    handles are opened lazily in each process."""

    def __init__(self, reader: SplitReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.reader.read(int(index))

    def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return self.reader.read(np.asarray(indices, dtype=np.int64))

    def __repr__(self) -> str:
        r = self.reader
        return f"LakeDataSource(table={r.table!r}, version={r.version}, split={r.split!r}, n={len(r)})"
