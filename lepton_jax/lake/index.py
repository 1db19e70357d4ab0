"""The content-hash index of an ingest: exact dedup and the leak check across a whole dataset in bounded memory.

One record per kept example content (its row hash: the table's hash of its arrays, 32 bytes). Records are appended
to a file of fixed-size rows on disk (the full hash, label, split, state, fragment, row, source index, where its id
is); lookups go through sorted runs of ``(first 8 bytes of the hash, record number)``. The newest entries gather in
memory (up to :data:`MEMORY_RUN`), then become a run on disk; runs merge like a log-structured merge tree (a new run
merges into the previous one while that one is at most twice its size, up to :data:`MAX_RUN` entries), so there are
O(log n) runs and a lookup of a batch is one vectorised ``np.searchsorted`` per run on a memory map. A prefix match
is confirmed against the full hash in the record file, so the check is exact. Memory stays bounded by the largest
run being merged (``MAX_RUN`` × 16 bytes) and the batch, whatever the dataset's size. An append first loads the
hashes the table already holds by their 8-byte prefixes alone (:meth:`HashIndex.add_table_keys`; a fragment's full
row hashes and labels are loaded only when one of its keys matches a lookup), so appended data is checked against
the table as well as against itself; those are not copied to disk (their keys in memory, in row order: 8 bytes per
row, 16 once a fifth lookup sorts them; records made on demand), so an append writes what it adds and reads a
quarter of the table's row hashes. """

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

TABLE, NEW, CONFLICT = 0, 1, 2  # where a hash's kept copy lives: the table already, this ingest, or nowhere (conflict)
MEMORY_RUN = 2**16  # entries gathered in memory (1 MiB) before they become a run on disk
MAX_RUN = 2**21  # entries of the largest sorted run (32 MiB on disk; a merge holds about three times that)
SCANS_BEFORE_SORT = 4  # lookups that scan the table's keys before they are sorted (see HashIndex._table_matches)
SCAN_BITS = 20  # the probes' bitmap in a scan: 2**20 booleans (1 MiB: in a core's cache)
TABLE_BASE = 1 << 48  # record numbers from here name the table's rows (add_table), not records on disk
_NO_ID, _ID_FILE = -1, -2  # where a record's id comes from: "example <source>", the id file, or a lazy sequence (>= 0)
RECORD = np.dtype([("h", "V32"), ("label", "<i8"), ("source", "<i8"), ("id_pos", "<i8"), ("fragment", "<i4"),
                   ("row", "<i4"), ("id_src", "<i4"), ("id_len", "<i4"), ("split", "<i2"), ("state", "u1"),
                   ("_pad", "u1")])


class Hit(NamedTuple):
    label: int
    split: str
    state: int
    fragment: int
    row: int
    index: int
    ident: str


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Runs ``a`` and ``b`` (each ``(2, n)`` uint64: keys sorted, then record numbers) as one sorted run, in linear
    passes: each of ``b``'s entries goes after ``a``'s entries with keys up to its own."""
    at = np.searchsorted(a[0], b[0], "right") + np.arange(b.shape[1])
    out = np.empty((2, a.shape[1] + b.shape[1]), dtype=np.uint64)
    rest = np.ones(out.shape[1], dtype=bool)
    rest[at] = False
    out[:, at] = b
    out[:, rest] = a
    return out


def prefix_keys(hashes: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each ``(n, 32)`` uint8 hash as an unsigned integer whose order is the bytes' order."""
    return np.ascontiguousarray(hashes[:, :8]).view(">u8").reshape(-1).astype(np.uint64)


class HashIndex:
    """``hash -> record number -> (label, split, state, fragment, row, source index, id)`` in files under a temporary
    directory in ``directory`` (default: the system's temp directory)."""

    def __init__(self, directory: str | Path | None = None, max_run: int = MAX_RUN, memory_run: int = MEMORY_RUN):
        self._dir = tempfile.TemporaryDirectory(prefix="lake-index-", dir=directory)
        self.path = Path(self._dir.name)
        self.max_run, self.memory_run = int(max_run), int(memory_run)
        self._records = open(self.path / "records", "w+b")  # noqa: SIM115 - closed in close()
        self._ids = open(self.path / "ids", "w+b")  # noqa: SIM115
        self._ids_end = 0
        self._lazy_ids: list[Sequence[str]] = []
        self.n = 0
        self._memory: np.ndarray | None = None  # the newest entries, sorted, until there are MEMORY_RUN of them
        # (file of a (2, n) uint64 array: keys sorted, each row contiguous for searchsorted; record numbers), entries
        self._runs: list[tuple[Path, int]] = []
        self._next_run = 0
        self._splits: list[str] = []
        # the table's rows (add_table_keys): blocks of [rows, load, (hashes, labels) once loaded, split], one sorted
        # run of their keys, and the table records marked as conflicts
        self._table: list[list[Any]] = []
        self._table_starts: list[int] = []
        self._table_n = 0
        self._table_keys: list[np.ndarray] = []  # each block's keys, in row order
        self._table_sorted: np.ndarray | None = None  # all of them sorted (see _table_matches)
        self._table_scans = 0  # lookups that scanned the table's keys (see _table_matches)
        self._table_conflicts: set[int] = set()

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """For each ``(n, 32)`` uint8 hash: the number of the record holding it, or -1."""
        hashes = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(-1, 32)
        out = np.full(hashes.shape[0], -1, dtype=np.int64)
        if not hashes.shape[0] or not (self.n or self._table_n):
            return out
        keys = prefix_keys(hashes)
        order = np.argsort(keys)  # sorted probes: searchsorted walks each run once
        sorted_keys = keys[order]
        self._lookup_table(hashes, keys, sorted_keys, out)
        for run in self._sorted_runs():
            if run is None:
                continue
            run_keys = run[0]
            lo = np.searchsorted(run_keys, sorted_keys, "left")
            found = lo < run_keys.shape[0]
            found[found] = run_keys[lo[found]] == sorted_keys[found]
            for k in np.flatnonzero(found):  # prefix matches (real duplicates, or one in 2**64 by chance)
                i = int(order[k])
                j = int(lo[k])
                while out[i] < 0 and j < run_keys.shape[0] and run_keys[j] == sorted_keys[k]:
                    rec = int(run[1, j])
                    if self._read(rec)["h"].tobytes() == hashes[i].tobytes():
                        out[i] = rec
                    j += 1
            del run, run_keys
        return out

    def add(self, hashes: np.ndarray, labels: np.ndarray, split: str, state: int, fragment: int, rows: np.ndarray,
            sources: np.ndarray, ids: Sequence[str] | None = None, id_pos: np.ndarray | None = None) -> None:
        """Adds one record per hash (hashes must be new). ``ids[id_pos[k]]`` names record ``k`` (default
        ``"example <source>"``); a list's or tuple's ids are written to disk, any other sequence (ids made on demand,
        like :class:`~lepton_jax.lake.sources.RowIds`) is kept."""
        n = int(np.asarray(hashes).shape[0])
        if not n:
            return
        rec = np.zeros(n, dtype=RECORD)
        hashes = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(n, 32)
        rec["h"] = hashes.view("V32").reshape(n)
        rec["label"], rec["source"], rec["row"], rec["fragment"] = labels, sources, rows, fragment
        rec["state"] = state
        if split not in self._splits:
            self._splits.append(split)
        rec["split"] = self._splits.index(split)
        rec["id_src"] = _NO_ID
        if ids is not None:
            pos = np.asarray(id_pos, dtype=np.int64)
            if isinstance(ids, (list, tuple)):  # ids held in memory: to disk, so memory does not grow
                encoded = [ids[int(p)].encode() for p in pos]
                lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
                rec["id_src"], rec["id_len"] = _ID_FILE, lengths
                rec["id_pos"] = self._ids_end + np.cumsum(lengths) - lengths
                self._ids.seek(self._ids_end)
                self._ids.write(b"".join(encoded))
                self._ids_end += int(lengths.sum())
            else:
                self._lazy_ids.append(ids)
                rec["id_src"], rec["id_pos"] = len(self._lazy_ids) - 1, pos
        self._records.seek(self.n * RECORD.itemsize)
        self._records.write(rec.tobytes())
        keys = prefix_keys(hashes)
        order = np.argsort(keys)  # the order of equal keys does not matter: lookups check every one
        run = np.stack([keys[order], order.astype(np.uint64) + np.uint64(self.n)])
        self.n += n
        if self._memory is not None:  # small adds gather in memory first: no file per fragment
            run = _merge(self._memory, run)
        if run.shape[1] < self.memory_run:
            self._memory = run
            return
        self._memory = None
        while self._runs and self._runs[-1][1] <= 2 * run.shape[1] and self._runs[-1][1] + run.shape[1] <= \
                self.max_run:
            path, _ = self._runs.pop()
            run = _merge(np.load(path), run)
            path.unlink()
        path = self.path / f"run{self._next_run:06d}.npy"
        self._next_run += 1
        np.save(path, run)
        self._runs.append((path, run.shape[1]))

    def _lookup_table(self, hashes: np.ndarray, keys: np.ndarray, sorted_keys: np.ndarray, out: np.ndarray) -> None:
        """Sets ``out[i]`` to the table record holding ``hashes[i]``, if any (prefix matches from
        :meth:`_table_matches`, each confirmed against the fragment's full hash)."""
        if not self._table_n:
            return
        matches = self._table_matches(sorted_keys)
        if not any(m.size for m in matches):  # the usual case: no appended row is in the table
            return
        matched = np.concatenate([block[m] for block, m in zip(self._table_keys, matches, strict=True)])
        probes: dict[int, list[int]] = {}
        for i in np.flatnonzero(np.isin(keys, matched)):
            probes.setdefault(int(keys[i]), []).append(int(i))
        start = 0
        for block, rows in zip(self._table_keys, matches, strict=True):
            for j in rows:
                rec = TABLE_BASE + start + int(j)
                for i in probes[int(block[j])]:
                    if out[i] < 0 and self._read(rec)["h"].tobytes() == hashes[i].tobytes():
                        out[i] = rec
            start += block.shape[0]

    def _table_matches(self, sorted_keys: np.ndarray) -> list[np.ndarray]:
        """For each table block, the rows whose key is one of ``sorted_keys`` (sorted). The first
        :data:`SCANS_BEFORE_SORT` lookups scan the table's keys once each, in row order, through a bitmap of the
        probes' low bits (an append's one or few lookups never sort the table: a scan costs a few passes over the
        keys, a sort about twenty); later ones sort the table's keys once and binary-search them."""
        if self._table_sorted is None and self._table_scans < SCANS_BEFORE_SORT:
            self._table_scans += 1
            low = np.uint64((1 << SCAN_BITS) - 1)
            probed = np.zeros(1 << SCAN_BITS, dtype=bool)
            probed[(sorted_keys & low).astype(np.intp)] = True
            matches = []
            for block in self._table_keys:
                rows = np.flatnonzero(probed[(block & low).astype(np.intp)])  # ~ len(probes) / 2**SCAN_BITS false
                if rows.size:
                    at = np.searchsorted(sorted_keys, block[rows]).clip(max=sorted_keys.shape[0] - 1)
                    rows = rows[sorted_keys[at] == block[rows]]
                matches.append(rows)
            return matches
        if self._table_sorted is None:
            self._table_sorted = np.sort(np.concatenate(self._table_keys))
        table = self._table_sorted
        lo = np.searchsorted(table, sorted_keys, "left")
        found = lo < table.shape[0]
        found[found] = table[lo[found]] == sorted_keys[found]
        if not found.any():
            return [np.zeros(0, dtype=np.intp) for _ in self._table_keys]
        return [np.flatnonzero(np.isin(block, sorted_keys[found])) for block in self._table_keys]

    def _sorted_runs(self) -> Iterator[np.ndarray | None]:
        """The in-memory run and each run on disk (mapped), one at a time."""
        yield self._memory
        for path, _ in self._runs:
            yield np.load(path, mmap_mode="r")

    def add_table(self, hashes: np.ndarray, labels: np.ndarray, split: str) -> None:
        """Adds the table's rows of one fragment (state TABLE, no fragment, row or source of this ingest), kept as
        the given arrays (not copied to disk; the caller keeps them unchanged)."""
        hashes = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(-1, 32)
        labels = np.asarray(labels)
        self.add_table_keys(prefix_keys(hashes), split, lambda: (hashes, labels))

    def add_table_keys(self, keys: np.ndarray, split: str,
                       load: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """Adds the table's rows of one fragment by their hashes' 8-byte sort keys (:func:`prefix_keys`) alone;
        ``load()`` gives the fragment's full ``(n, 32)`` hashes and labels, called only when a lookup matches one
        of these keys (then kept)."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        n = int(keys.shape[0])
        if not n:
            return
        if split not in self._splits:
            self._splits.append(split)
        self._table.append([n, load, None, self._splits.index(split)])
        self._table_starts.append(self._table_n)
        self._table_keys.append(keys)
        self._table_sorted, self._table_scans = None, 0  # scanned or sorted again, with these keys, from now on
        self._table_n += n

    def _read(self, number: int) -> np.ndarray:
        if number >= TABLE_BASE:
            k = number - TABLE_BASE
            b = int(np.searchsorted(self._table_starts, k, "right")) - 1
            block = self._table[b]
            if block[2] is None:  # a key matched: the fragment's full hashes and labels, once
                hashes, labels = block[1]()
                block[2] = (np.asarray(hashes, np.uint8).reshape(block[0], 32), np.asarray(labels).reshape(-1))
            (hashes, labels), split = block[2], block[3]
            i = k - self._table_starts[b]
            rec = np.zeros(1, dtype=RECORD)[0]
            rec["h"] = hashes[i].tobytes()
            rec["label"], rec["source"], rec["row"], rec["fragment"] = int(labels[i]), -1, -1, -1
            rec["split"], rec["id_src"] = split, _NO_ID
            rec["state"] = CONFLICT if k in self._table_conflicts else TABLE
            return rec
        self._records.flush()
        data = os.pread(self._records.fileno(), RECORD.itemsize, number * RECORD.itemsize)
        return np.frombuffer(data, dtype=RECORD)[0]

    def record(self, number: int) -> Hit:
        """The record ``number`` (from :meth:`lookup`)."""
        r = self._read(number)
        src = int(r["id_src"])
        if src == _NO_ID:
            ident = f"example {int(r['source'])}"
        elif src == _ID_FILE:
            self._ids.flush()
            ident = os.pread(self._ids.fileno(), int(r["id_len"]), int(r["id_pos"])).decode()
        else:
            ident = self._lazy_ids[src][int(r["id_pos"])]
        return Hit(int(r["label"]), self._splits[int(r["split"])], int(r["state"]), int(r["fragment"]), int(r["row"]),
                   int(r["source"]), ident)

    def mark_conflict(self, number: int) -> None:
        """Marks record ``number``: its content came with two labels, so no copy of it is kept."""
        if number >= TABLE_BASE:
            self._table_conflicts.add(number - TABLE_BASE)
            return
        r = self._read(number).copy()
        r["state"] = CONFLICT
        self._records.seek(number * RECORD.itemsize)
        self._records.write(r.tobytes())

    def __len__(self) -> int:
        return self.n + self._table_n

    def splits_of(self) -> Iterator[tuple[str, int]]:
        """``(split, count)`` of kept hashes (for the leak assertion: each hash has exactly one split)."""
        self._records.flush()
        counts = np.zeros(len(self._splits), dtype=np.int64)
        for start in range(0, self.n, 2**16):
            block = np.fromfile(self.path / "records", dtype=RECORD, count=min(2**16, self.n - start),
                                offset=start * RECORD.itemsize)
            np.add.at(counts, block["split"][block["state"] != CONFLICT], 1)
        for (n, _, _, split), start in zip(self._table, self._table_starts, strict=True):
            conflicts = sum(1 for k in self._table_conflicts if start <= k < start + n)
            counts[split] += n - conflicts
        yield from ((s, int(c)) for s, c in zip(self._splits, counts, strict=True) if c)

    def close(self) -> None:
        self._records.close()
        self._ids.close()
        self._dir.cleanup()

    def __enter__(self) -> HashIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
