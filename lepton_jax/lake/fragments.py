"""Fragments: the immutable unit a table version is made of.

A fragment is a set of zarr v3 arrays that share axis 0 (one logical slice of a split), written once under
``data/<commit-id>/<split>/<fragment>/<array>/``, plus its row hashes: one identity per row over the row's content
(its non-label arrays, in sorted name order), 32 raw bytes per row, in ``_rows.xxh3_128`` (the xxh3-128 digest in the
first 16 bytes, zeros after; the record's entry says ``"hash": "xxh3_128"``) or, in tables created before it was the
default or with ``row_hash="sha256"``, ``_rows.sha256`` (the sha256). Every fragment of a table uses the table's row
hash (dedup compares them across fragments). A split of a version is the concatenation of its
fragments in the order the record lists them. Records name fragments by their path relative to the table, never by
listing a directory, so the same record works on a filesystem and on an object store.

The row hashes serve four things without reading the data: the exact-dedup and leak index of an append (what does
the table already hold?), the split's logical ``content_sha256`` (independent of how rows are cut into fragments, so
compaction provably keeps it), per-fragment statistics partials that combine exactly into version statistics, and
the reads' check of every row they return (:class:`~lepton_jax.lake.read.SplitReader`): a reader re-hashes the rows
it gathers and compares the first :data:`KEY_BYTES` bytes with the hash file's keys, which it loads with one ranged
read. xxh3-128 is about 5x cheaper per row than sha256 but not a cryptographic hash: rows crafted to collide could
make dedup drop a distinct example, so a table ingesting untrusted data can be created with ``row_hash="sha256"``.
Re-hashing rows with sha256 on every read would cost that factor, so the fragments of sha256 tables also store row
checks (``_rows.xxh3``: the xxh3-64 of the same bytes, 8 bytes per row), which their reads compare instead
(:func:`stores_row_checks`); xxh3-128 tables written before this revision have them too, and readers use them.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from lepton_jax.errors import LakeError
from lepton_jax.lake import arrays
from lepton_jax.lake.faults import armed, crash_point
from lepton_jax.lake.storage import Storage

ROW_HASH_SHA256, ROW_HASH_XXH3 = "sha256", "xxh3_128"  # the row hashes a fragment's entry may name
ROW_HASHES = (ROW_HASH_XXH3, ROW_HASH_SHA256)
DEFAULT_ROW_HASH = ROW_HASH_XXH3  # a new table's row hash
ROW_CHECKS = "_rows.xxh3"
ROW_CHECK_HASH = "xxh3_64"  # the hash the record names for the row checks (readers ignore checks of another name)
KEY_BYTES = 8  # a row hash's prefix an append's index holds per table row (the rest is read on a prefix match)
KEYS_FIRST = "keys-first"  # the hash file's layout: every row's first KEY_BYTES bytes, then the rest of each
CHAIN_ROWS = 64  # rows per link of a split's content chain (content_chain)
LABEL = "label"
CONTENT_READERS = 4  # threads reading fragments for a split's content digest
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# bytes of the temporaries per block of the statistics: few blocks, so a thread computing them while another holds
# the GIL (hashing rows) waits for it a few times, not once per small block
MOMENT_BLOCK_BYTES = 2**25
BYTE_MOMENT_BLOCK = 2**20  # values per block of the 1-byte statistics (_byte_moments): a 2 MiB scratch array
KEYS_CACHE_BYTES = 256 * 2**20  # a process's cache of fragments' row hashes and labels (fragment_keys)
# (storage, table, fragment, row-hash digest, label digest) -> (row hashes, labels or None), least recently used first
_keys: collections.OrderedDict[tuple, tuple[np.ndarray, np.ndarray | None]] = collections.OrderedDict()
_keys_lock = threading.Lock()


def safe_relpath(rel: str) -> str:
    """A path from a commit record must stay inside its table directory (``data/...``, no ``..``)."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or any(p in ("..", "") for p in parts) or not parts or parts[0] != "data":
        raise LakeError(f"commit record names an unsafe array path {rel!r}")
    return rel


def check_name(kind: str, name: str) -> str:
    """Table, split and array names become path components: no separators, no ``..``; table names beginning with
    ``_`` are reserved for the lake's own entries (``_models``: the model registry)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise LakeError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' "
                        "(no path separators, no '..')")
    if kind == "table" and name.startswith("_"):
        raise LakeError(f"table name {name!r} is reserved: names beginning with '_' belong to the lake itself "
                        "(_models is the model registry); choose a name starting with a letter or digit")
    return name


def row_hashes(named: dict[str, np.ndarray], label_array: str = LABEL, *, row_hash: str) -> np.ndarray:
    """``(n, 32)`` uint8: the ``row_hash`` (:data:`ROW_HASHES`) of each row's bytes over the non-label arrays in
    sorted name order (xxh3-128: the digest, then 16 zero bytes)."""
    return row_digests(named, label_array, checks=False, row_hash=row_hash)[0]


def check_row_hash(row_hash: str) -> str:
    """``row_hash`` if this code knows it, else a one-line error."""
    if row_hash not in ROW_HASHES:
        raise LakeError(f"unknown row hash {row_hash!r}: use one of {list(ROW_HASHES)}")
    return row_hash


def row_hash_field(row_hash: str, digest: np.ndarray | bytes | None) -> dict[str, str | None]:
    """A quarantine entry's identity field: ``{row_hash: hex digest}`` (xxh3-128: its 16 bytes, not the padding)."""
    if digest is None:
        return {row_hash: None}
    raw = bytes(digest)
    return {row_hash: (raw if row_hash == ROW_HASH_SHA256 else raw[:16]).hex()}


def fragment_row_hash(frag: dict[str, Any]) -> str:
    """The row hash a fragment's entry names (``sha256`` for fragments written before entries named one)."""
    return check_row_hash((frag.get("row_hashes") or {}).get("hash", ROW_HASH_SHA256))


def table_row_hash(fragments: Iterable[dict[str, Any]], default: str = DEFAULT_ROW_HASH) -> str:
    """The row hash of a table whose fragments are ``fragments`` (``default`` when there are none); an error if they
    disagree (dedup compares row hashes across fragments, so a table has one)."""
    names = {fragment_row_hash(f) for f in fragments}
    if len(names) > 1:
        raise LakeError(f"the table's fragments use different row hashes {sorted(names)}; run `lepton-jax lake verify`")
    return names.pop() if names else check_row_hash(default)


def stores_row_checks(row_hash: str) -> bool:
    """Whether a table whose rows are identified by ``row_hash`` stores row checks (``_rows.xxh3``) beside its row
    hashes: only sha256 tables, whose reads would otherwise re-hash every row with sha256; reads of xxh3-128
    fragments compare the row hash's keys (:func:`row_keys`), so ingest hashes each row once."""
    return check_row_hash(row_hash) == ROW_HASH_SHA256


def row_keys(named: dict[str, np.ndarray], label_array: str = LABEL, *, row_hash: str) -> np.ndarray:
    """``(n,)`` uint64: the first :data:`KEY_BYTES` bytes of each row's hash as sort keys, what
    :func:`fragment_row_keys` returns for the stored rows (a read compares the two)."""
    n, flats = _row_bytes(named, label_array)
    if row_hash == ROW_HASH_XXH3 and len(flats) == 1:  # a read's hot path: the digests joined, no padded array
        rows, width, digest = flats[0], len(flats[0]) // n, xxhash.xxh3_128_digest
        joined = b"".join([digest(rows[a:a + width]) for a in range(0, n * width, width)])
        return _sort_keys(np.frombuffer(joined, np.uint8).reshape(n, 16)[:, :KEY_BYTES])
    return _sort_keys(row_hashes(named, label_array, row_hash=row_hash)[:, :KEY_BYTES])


def row_checks(named: dict[str, np.ndarray], label_array: str = LABEL) -> np.ndarray:
    """``(n,)`` uint64: xxh3-64 of each row's bytes (the bytes :func:`row_hashes` hashes), the reads' check."""
    return row_digests(named, label_array, hashes=False)[1]


def row_digests(named: dict[str, np.ndarray], label_array: str = LABEL, *, hashes: bool = True,
                checks: bool = True, row_hash: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The row hashes (:func:`row_hashes`, ``row_hash`` required with ``hashes``) and row checks
    (:func:`row_checks`) in one pass over the rows, each row's bytes sliced once; one left out (an empty array in its
    place) when not asked for."""
    if hashes:
        check_row_hash(row_hash)
    n, flats = _row_bytes(named, label_array)
    xxh3, xxh128, sha256 = xxhash.xxh3_64_intdigest, xxhash.xxh3_128_digest, hashlib.sha256
    is_sha = row_hash == ROW_HASH_SHA256
    digests: list[bytes] = []
    values: list[int] = []
    if len(flats) == 1:  # one digest per slice of a memoryview, joined: no array per row
        rows, width = flats[0], len(flats[0]) // n
        starts = range(0, n * width, width)
        if hashes and checks:
            add_digest, add_value = digests.append, values.append
            if is_sha:
                for a in starts:
                    row = rows[a:a + width]
                    add_digest(sha256(row).digest())
                    add_value(xxh3(row))
            else:
                for a in starts:
                    row = rows[a:a + width]
                    add_digest(xxh128(row))
                    add_value(xxh3(row))
        elif hashes:
            digests = ([sha256(rows[a:a + width]).digest() for a in starts] if is_sha
                       else [xxh128(rows[a:a + width]) for a in starts])
        else:
            values = [xxh3(rows[a:a + width]) for a in starts]
    else:  # several arrays (or none): each row's parts fed to the hashes asked for, in sorted name order
        widths = [len(f) // n for f in flats]
        for i in range(n):
            h = (sha256() if is_sha else xxhash.xxh3_128()) if hashes else None
            x = xxhash.xxh3_64() if checks else None
            for f, w in zip(flats, widths, strict=True):
                part = f[i * w:(i + 1) * w]
                if h is not None:
                    h.update(part)
                if x is not None:
                    x.update(part)
            if h is not None:
                digests.append(h.digest())
            if x is not None:
                values.append(x.intdigest())
    if not hashes:
        identities = np.zeros((0, 32), np.uint8)
    elif is_sha:
        identities = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32).copy()
    else:  # 16-byte digests in 32-byte slots: every table's hash files, index and content chain share one layout
        identities = np.zeros((n, 32), np.uint8)
        identities[:, :16] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 16)
    return identities, np.array(values, dtype=np.uint64).reshape(n) if checks else np.zeros(0, np.uint64)


def _row_bytes(named: dict[str, np.ndarray], label_array: str) -> tuple[int, list[memoryview]]:
    """The number of rows and, per non-label array in sorted name order, its C-order bytes as one flat memoryview."""
    names = sorted(k for k in named if k != label_array)
    n = int(next(iter(named.values())).shape[0])
    if not n:
        return 0, []
    return n, [memoryview(np.ascontiguousarray(named[k]).reshape(n, -1).view(np.uint8).reshape(-1)) for k in names]


def partial_stats(named: dict[str, np.ndarray], label_array: str = LABEL) -> dict[str, Any]:
    """Sums that combine exactly across fragments: examples, class counts, and per array count/sum/sumsq/min/max."""
    labels = named.get(label_array)
    out: dict[str, Any] = {"num_examples": int(next(iter(named.values())).shape[0])}
    if labels is not None:
        out["class_counts"] = np.bincount(labels[labels >= 0]).tolist() if labels.size else []
    for name, value in named.items():
        if name == label_array or value.size == 0:
            continue
        out[name] = _moments(value)
    return out


def _moments(value: np.ndarray) -> dict[str, Any]:
    """count/sum/sumsq/min/max of every value, in bounded memory (temporaries of :data:`MOMENT_BLOCK_BYTES` per
    block; 1-byte values: :func:`_byte_moments`): exact integer sums for integers of up to 16 bits, float64
    otherwise."""
    flat = value.reshape(-1)
    exact = flat.dtype == np.bool_ or (np.issubdtype(flat.dtype, np.integer) and flat.dtype.itemsize <= 2)
    total, squares = 0, 0
    fsum, fsq = 0.0, 0.0
    if exact and flat.dtype.itemsize == 1:
        total, squares = _byte_moments(flat)
    else:
        step = MOMENT_BLOCK_BYTES // 8
        for start in range(0, flat.size, step):
            block = flat[start:start + step]
            if exact:  # not a BLAS dot: OpenBLAS's threads would take the other cores (and spin) for little gain
                v = block.astype(np.int64)
                total += int(v.sum())
                squares += int((v * v).sum())
            else:
                v = block.astype(np.float64)
                fsum += float(v.sum())
                fsq += float(v @ v)
    out = {"count": int(flat.size), "sum": float(total) if exact else fsum,
           "sumsq": float(squares) if exact else fsq, "min": float(flat.min()), "max": float(flat.max())}
    if value.ndim == 2:  # a tabular array (one axis per example): per-column partials too
        out["columns"] = _column_moments(value)
    return out


def _byte_moments(flat: np.ndarray) -> tuple[int, int]:
    """Exact sum and sum of squares of 1-byte values, in cache-sized blocks through one reused 16-bit scratch array
    (statistics of 100,000 28x28 rows: 53 ms, 123 ms in blocks of :data:`MOMENT_BLOCK_BYTES`); a block's sum is
    reduced in 32 bits (exact: at most 2**20 * 255), its squares in 64."""
    signed = flat.dtype == np.int8
    scratch = np.empty(min(flat.size, BYTE_MOMENT_BLOCK), dtype=np.int16 if signed else np.uint16)
    narrow, wide = (np.int32, np.int64) if signed else (np.uint32, np.uint64)
    total, squares = 0, 0
    for start in range(0, flat.size, BYTE_MOMENT_BLOCK):
        block = flat[start:start + BYTE_MOMENT_BLOCK]
        v = scratch[:block.size]
        np.copyto(v, block, casting="unsafe")
        total += int(np.add.reduce(v, dtype=narrow))
        squares += int(np.add.reduce(np.multiply(v, v, out=v), dtype=wide))
    return total, squares


def _column_moments(value: np.ndarray) -> dict[str, list[float]]:
    """Per-column (last axis) sum/sumsq/min/max of a 2-D array in float64, in blocks of about 2**20 values."""
    rows = max(1, 2**20 // max(1, value.shape[1]))
    total = np.zeros(value.shape[1])
    squares = np.zeros(value.shape[1])
    for start in range(0, value.shape[0], rows):
        v = value[start:start + rows].astype(np.float64)
        total += v.sum(axis=0)
        squares += (v * v).sum(axis=0)
    return {"sum": total.tolist(), "sumsq": squares.tolist(), "min": value.min(axis=0).astype(float).tolist(),
            "max": value.max(axis=0).astype(float).tolist()}


def _merge_columns(acc: dict[str, Any], s: dict[str, Any], first: bool) -> None:
    """Adds part ``s``'s per-column partials into ``acc`` (None once a part lacks them: e.g. version-1 fragments)."""
    cols = s.get("columns")
    have = acc.get("columns")
    if cols is None or (have is None and not first):
        acc["columns"] = None
    elif have is None:
        acc["columns"] = {k: list(v) for k, v in cols.items()}
    else:
        for k, op in (("sum", np.add), ("sumsq", np.add), ("min", np.minimum), ("max", np.maximum)):
            have[k] = op(have[k], cols[k]).tolist()


def merge_partials(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The partials of the concatenation of fragments with ``parts``."""
    out: dict[str, Any] = {"num_examples": 0}
    for p in parts:
        out["num_examples"] += p["num_examples"]
        if "class_counts" in p:
            have = out.setdefault("class_counts", [])
            have += [0] * (len(p["class_counts"]) - len(have))
            for k, c in enumerate(p["class_counts"]):
                have[k] += c
        for name, s in p.items():
            if isinstance(s, dict):
                _add_moments(out, name, s)
    for s in out.values():
        if isinstance(s, dict) and "columns" in s and s["columns"] is None:
            del s["columns"]
    return out


def _add_moments(into: dict[str, Any], name: str, s: dict[str, Any]) -> None:
    """Adds one partial's count/sum/sumsq/min/max (and per-column moments) of array ``name`` into ``into[name]``."""
    first = name not in into
    acc = into.setdefault(name, {"count": 0, "sum": 0.0, "sumsq": 0.0, "min": np.inf, "max": -np.inf})
    acc["count"] += s["count"]
    acc["sum"] += s["sum"]
    acc["sumsq"] += s["sumsq"]
    acc["min"], acc["max"] = min(acc["min"], s["min"]), max(acc["max"], s["max"])
    _merge_columns(acc, s, first)


def combine_stats(partials: Iterable[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Version statistics (examples, class counts, per array mean/std/min/max, and for a tabular 2-D array the same
    per column under ``columns``) from fragment partials."""
    total = {"num_examples": 0, "class_counts": [0] * num_classes}
    sums: dict[str, dict[str, float]] = {}
    for p in partials:
        total["num_examples"] += p["num_examples"]
        for k, c in enumerate(p.get("class_counts", [])):
            if k >= len(total["class_counts"]):
                total["class_counts"] += [0] * (k + 1 - len(total["class_counts"]))
            total["class_counts"][k] += c
        for name, s in p.items():
            if not isinstance(s, dict):
                continue
            _add_moments(sums, name, s)
    for name, acc in sums.items():
        mean = acc["sum"] / max(acc["count"], 1)
        var = max(acc["sumsq"] / max(acc["count"], 1) - mean * mean, 0.0)
        total[name] = {"mean": mean, "std": float(np.sqrt(var)), "min": acc["min"], "max": acc["max"]}
        cols = acc.get("columns")
        if cols is not None:  # tabular arrays: per-column mean/std/min/max
            rows = acc["count"] / max(len(cols["sum"]), 1)
            col_mean = np.asarray(cols["sum"]) / max(rows, 1)
            col_var = np.maximum(np.asarray(cols["sumsq"]) / max(rows, 1) - col_mean**2, 0.0)
            total[name]["columns"] = {"mean": col_mean.tolist(), "std": np.sqrt(col_var).tolist(),
                                      "min": cols["min"], "max": cols["max"]}
    return total


def legacy_partials(split_stats: dict[str, Any], values_per_example: dict[str, int]) -> dict[str, Any]:
    """Partials recovered from a version-1 record's split statistics (mean/std over every value)."""
    out: dict[str, Any] = {"num_examples": int(split_stats.get("num_examples", 0)),
                           "class_counts": list(split_stats.get("class_counts", []))}
    for name, s in split_stats.items():
        if isinstance(s, dict) and "mean" in s:
            count = max(1, out["num_examples"] * values_per_example.get(name, 1))
            out[name] = {"count": count, "sum": s["mean"] * count, "sumsq": (s["std"] ** 2 + s["mean"] ** 2) * count,
                         "min": s["min"], "max": s["max"]}
    return out


def write_fragment(storage: Storage, table: str, rel: str, named: dict[str, np.ndarray], *,
                   target_shard_bytes: int = arrays.TARGET_SHARD_BYTES, label_array: str = LABEL,
                   crash: bool = False, hashes: np.ndarray | Callable[[], np.ndarray] | None = None,
                   checks: np.ndarray | Callable[[], np.ndarray] | None = None,
                   compression: str = arrays.DEFAULT_COMPRESSION, row_hash: str) -> dict[str, Any]:
    """Writes one fragment at ``<table>/<rel>`` of ``storage`` (arrays in the ``compression`` layout, the row
    hashes (``row_hash``: the table's, :func:`table_row_hash`) and, where the table stores them
    (:func:`stores_row_checks`), the row checks), durably; returns its record entry.

    ``hashes`` and ``checks``: the rows' hashes (:func:`row_hashes`) and checks (:func:`row_checks`; ignored where
    the table stores none), or functions that return them, called once the arrays' writes are under way (the caller
    hashes meanwhile); computed here if None. ``crash`` passes the ``shard`` and ``array``
    fault-injection points (the first fragment of a commit) when one of
    them is armed: the arrays are then written one after the other, shard by shard."""
    sizes = {name: value.shape[0] for name, value in named.items()}
    if len(set(sizes.values())) != 1:
        raise LakeError(f"fragment {rel}: arrays must share their first axis, got {sizes}")
    entry: dict[str, Any] = {"path": rel, "num_examples": int(next(iter(sizes.values()))), "arrays": {}}
    keys = {name: f"{table}/{rel}/{check_name('array', name)}" for name in named}
    if crash and armed("shard", "array"):  # one array after the other, so the points fall where tests expect
        for k, (name, value) in enumerate(named.items()):
            hook = (lambda i: crash_point("shard") if i == 0 else None) if k == 0 else None
            digest = arrays.write_array(storage, keys[name], value, target_shard_bytes=target_shard_bytes,
                                        after_shard=hook, compression=compression)
            if k == 0:
                crash_point("array")
            entry["arrays"][name] = _array_entry(storage, rel, name, value, keys[name], digest)
        stats = partial_stats(named, label_array)
    else:  # every array's shards in flight at once; digests and statistics computed while TensorStore writes
        writes: dict[str, arrays.PendingWrite] = {}
        helped: list[Future[Any]] = []
        with ThreadPoolExecutor(len(named) + 1, thread_name_prefix="lake-fragment") as helpers:
            try:
                started = arrays.start_writes(storage, {keys[name]: value for name, value in named.items()},
                                              target_shard_bytes=target_shard_bytes, compression=compression)
                writes = {name: started[keys[name]] for name in named}
                # each array's content digest (sha256), then the wait for its shards and the fsyncs of its files:
                # all without the GIL, so beside the caller's row hashing and the statistics below
                finished = {name: helpers.submit(lambda w=w: w.finish(arrays.content_digest(w.array)))
                            for name, w in writes.items()}
                helped += finished.values()
                # the statistics (many numpy calls) wait for the caller's row hashing, which holds the GIL; after it
                # they have it to themselves (100,000 rows of 28x28 bytes: 68 ms after the hashing, 237 ms beside it)
                hashes, checks = _given_or_computed_digests(named, label_array, hashes, checks, row_hash)
                # the row files are written (and synced) beside the statistics, while the arrays are synced
                rows = helpers.submit(_write_row_files, storage, table, rel, hashes, checks, row_hash)
                helped.append(rows)
                stats = partial_stats(named, label_array)
                entry.update(rows.result())
                for name, value in named.items():
                    entry["arrays"][name] = _array_entry(storage, rel, name, value, keys[name],
                                                         finished[name].result())
            except BaseException:
                wait(helped)
                for write in writes.values():  # nothing may still write into the fragment once this returns
                    write.abandon()
                raise
    if "row_hashes" not in entry:
        hashes, checks = _given_or_computed_digests(named, label_array, hashes, checks, row_hash)
        entry.update(_write_row_files(storage, table, rel, hashes, checks, row_hash))
    entry["stats"] = stats
    remember_keys(storage, table, entry, label_array, hashes, named.get(label_array))
    return entry


def _given_or_computed_digests(named: dict[str, np.ndarray], label_array: str, hashes: Any, checks: Any,
                               row_hash: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``write_fragment``'s row hashes and checks (None where the table stores none, :func:`stores_row_checks`):
    the caller's (called if functions), the missing ones computed."""
    with_checks = stores_row_checks(row_hash)
    hashes = hashes() if callable(hashes) else hashes
    checks = (checks() if callable(checks) else checks) if with_checks else None
    if hashes is None or (with_checks and checks is None):
        mine = row_digests(named, label_array, hashes=hashes is None, checks=with_checks and checks is None,
                           row_hash=row_hash)
        hashes = mine[0] if hashes is None else hashes
        checks = mine[1] if with_checks and checks is None else checks
    return np.ascontiguousarray(hashes, dtype=np.uint8), checks


def _write_row_files(storage: Storage, table: str, rel: str, hashes: np.ndarray, checks: np.ndarray | None,
                     row_hash: str) -> dict[str, Any]:
    """Writes a fragment's row hashes (and row checks, if any) durably; returns their record entries."""
    out = {"row_hashes": write_row_hashes(storage, table, rel, hashes, row_hash)}
    if checks is not None:
        out["row_checks"] = write_row_checks(storage, table, rel, checks)
    return out


def remember_keys(storage: Storage, table: str, entry: dict[str, Any], label_array: str, hashes: np.ndarray,
                  labels: np.ndarray | None) -> None:
    """Keeps a fragment this process just wrote (record ``entry``) in the cache :func:`fragment_keys` reads, from
    what was written (copies), so that nothing reads it back."""
    _remember(_keys_key(storage, table, entry, label_array),
              (np.array(hashes, np.uint8).reshape(-1, 32), None if labels is None else np.array(labels)))


def write_row_hashes(storage: Storage, table: str, rel: str, hashes: np.ndarray, row_hash: str) -> dict[str, Any]:
    """Writes fragment ``rel``'s ``(n, 32)`` row hashes (made by ``row_hash``) durably in the :data:`KEYS_FIRST`
    layout, in ``_rows.<row_hash>``; returns their record entry (digests of the whole file and of its keys, and
    the hash)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(-1, 32)
    keys = np.ascontiguousarray(hashes[:, :KEY_BYTES]).tobytes()
    payload = keys + np.ascontiguousarray(hashes[:, KEY_BYTES:]).tobytes()
    path = f"{rel}/_rows.{check_row_hash(row_hash)}"
    storage.write(f"{table}/{path}", payload)
    return {"path": path, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
            "layout": KEYS_FIRST, "keys_sha256": hashlib.sha256(keys).hexdigest(), "hash": row_hash}


def write_row_checks(storage: Storage, table: str, rel: str, checks: np.ndarray) -> dict[str, Any]:
    """Writes fragment ``rel``'s row checks (:func:`row_checks`, 8 little-endian bytes per row) durably; returns
    their record entry (the file's size and sha256, and the hash that made the checks)."""
    payload = np.ascontiguousarray(checks, dtype="<u8").tobytes()
    storage.write(f"{table}/{rel}/{ROW_CHECKS}", payload)
    return {"path": f"{rel}/{ROW_CHECKS}", "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
            "hash": ROW_CHECK_HASH}


def read_row_checks(storage: Storage, table: str, frag: dict[str, Any]) -> np.ndarray | None:
    """A fragment's ``(n,)`` uint64 row checks, the file checked against the record; None if the fragment has none
    (written before them, or with a hash this code does not know)."""
    meta = frag.get("row_checks")
    if meta is None or meta.get("hash") != ROW_CHECK_HASH:
        return None
    data = _read_recorded(storage, table, meta, "row checks")
    if len(data) != 8 * int(frag["num_examples"]):
        raise LakeError(f"row checks {storage.describe(table + '/' + meta['path'])} hold {len(data) // 8} rows, "
                        f"the fragment {frag['num_examples']}; run `lepton-jax lake verify`")
    return np.frombuffer(data, "<u8").astype(np.uint64)


def _read_recorded(storage: Storage, table: str, meta: dict[str, Any], what: str) -> bytes:
    """The bytes of the file a record entry ``meta`` names (``path``, ``bytes``, ``sha256``), checked against it."""
    key = f"{table}/{safe_relpath(meta['path'])}"
    path = storage.describe(key)
    try:
        data = storage.read(key)
    except OSError as e:
        raise LakeError(f"{what} {path} are unreadable ({e}); run `lepton-jax lake verify`") from e
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise LakeError(f"{what} {path} do not match the digest in their commit record")
    return data


def _array_entry(storage: Storage, rel: str, name: str, value: np.ndarray, key: str, digest: str) -> dict[str, Any]:
    return {"path": f"{rel}/{name}", "dtype": value.dtype.name, "shape": list(value.shape), "sha256": digest,
            "files": arrays.file_digests(storage, key)}


def split_fragments(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The fragments of a split entry; a version-1 entry (arrays at the top) is one fragment without row hashes."""
    if "fragments" in entry:
        return list(entry["fragments"])
    first = next(iter(entry["arrays"].values()))["path"]
    rows = entry["num_rows"] if "num_rows" in entry else entry.get("num_examples", 0)  # quarantine: rows != entries
    return [{"path": first.rsplit("/", 1)[0], "num_examples": int(rows), "arrays": entry["arrays"]}]


def logical_arrays(fragments: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` of the concatenation of ``fragments``; errors if they disagree."""
    out: dict[str, dict[str, Any]] = {}
    for frag in fragments:
        for name, meta in frag["arrays"].items():
            have = out.setdefault(name, {"dtype": meta["dtype"], "shape": [0, *meta["shape"][1:]]})
            if have["dtype"] != meta["dtype"] or have["shape"][1:] != list(meta["shape"][1:]):
                raise LakeError(f"fragment {frag['path']} has {name!r} {meta['dtype']} {meta['shape'][1:]}, the "
                                f"others {have['dtype']} {have['shape'][1:]}")
            have["shape"][0] += int(meta["shape"][0])
    return out


def read_row_hashes(storage: Storage, table: str, frag: dict[str, Any], label_array: str = LABEL) -> np.ndarray:
    """A fragment's ``(n, 32)`` row hashes: from its hash file (checked against the record), or computed from the
    data for version-1 fragments."""
    meta = frag.get("row_hashes")
    if meta is None:
        named = {name: arrays.read(arrays.open_array(storage, f"{table}/{safe_relpath(m['path'])}"), path=m["path"])
                 for name, m in frag["arrays"].items()}
        return row_hashes(named, label_array, row_hash=ROW_HASH_SHA256)
    return stored_row_hashes(_read_recorded(storage, table, meta, "row hashes"), meta)


def stored_row_hashes(data: bytes, meta: dict[str, Any]) -> np.ndarray:
    """The ``(n, 32)`` row hashes from a hash file's bytes, in the layout its record ``meta`` names: 32 bytes per
    row, or (:data:`KEYS_FIRST`) every row's first :data:`KEY_BYTES` bytes, then every row's other bytes."""
    flat = np.frombuffer(data, dtype=np.uint8)
    if meta.get("layout") != KEYS_FIRST:
        return flat.reshape(-1, 32)
    n = flat.size // 32
    return np.concatenate([flat[:n * KEY_BYTES].reshape(n, KEY_BYTES), flat[n * KEY_BYTES:].reshape(n, -1)], axis=1)


def fragment_row_keys(storage: Storage, table: str, frag: dict[str, Any], label_array: str = LABEL) -> np.ndarray:
    """The first :data:`KEY_BYTES` bytes of each row hash of a fragment, as ``(n,)`` uint64 sort keys
    (:func:`~lepton_jax.lake.index.prefix_keys`): what an append's index holds for the table's rows. From a
    :data:`KEYS_FIRST` hash file only its first quarter is read (one ranged read, checked against the record's
    ``keys_sha256``); from the process's cache when this process has the hashes; otherwise the whole file."""
    meta = frag.get("row_hashes")
    with _keys_lock:
        found = _keys.get(_keys_key(storage, table, frag, label_array))
    if found is not None or meta is None or meta.get("layout") != KEYS_FIRST:
        hashes = found[0] if found is not None else fragment_keys(storage, table, frag, label_array)[0]
        return _sort_keys(hashes[:, :KEY_BYTES])
    key = f"{table}/{safe_relpath(meta['path'])}"
    size = int(frag["num_examples"]) * KEY_BYTES
    try:
        data = storage.read_range(key, 0, size)
    except OSError as e:
        raise LakeError(f"row hashes {storage.describe(key)} are unreadable ({e}); run `lepton-jax lake verify`") from e
    if len(data) != size or hashlib.sha256(data).hexdigest() != meta["keys_sha256"]:
        raise LakeError(f"row hashes {storage.describe(key)} do not match the digest in their commit record")
    return _sort_keys(np.frombuffer(data, np.uint8).reshape(-1, KEY_BYTES))


def _sort_keys(prefixes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(prefixes).view(">u8").reshape(-1).astype(np.uint64)


def _keys_key(storage: Storage, table: str, frag: dict[str, Any], label_array: str) -> tuple:
    label = frag["arrays"].get(label_array, {}).get("sha256")
    return storage.uri, table, frag["path"], (frag.get("row_hashes") or {}).get("sha256"), label_array, label


def _remember(key: tuple, value: tuple[np.ndarray, np.ndarray | None]) -> None:
    for v in value:
        if v is not None:
            v.flags.writeable = False
    with _keys_lock:
        _keys[key] = value
        _keys.move_to_end(key)
        total = sum(h.nbytes + (0 if lab is None else lab.nbytes) for h, lab in _keys.values())
        while total > KEYS_CACHE_BYTES and len(_keys) > 1:
            h, lab = _keys.popitem(last=False)[1]
            total -= h.nbytes + (0 if lab is None else lab.nbytes)


def fragment_keys(storage: Storage, table: str, frag: dict[str, Any], label_array: str = LABEL
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """A fragment's ``(n, 32)`` row hashes and its labels (None without a label array): what the dedup and leak
    index and the content digest need, never its example arrays. Read once per process and kept (fragments are
    immutable; keyed by their recorded digests, bounded by :data:`KEYS_CACHE_BYTES`); a fragment this process
    wrote is kept from what was written (:func:`write_fragment`), not read back."""
    key = _keys_key(storage, table, frag, label_array)
    with _keys_lock:
        found = _keys.get(key)
        if found is not None:
            _keys.move_to_end(key)
            return found
    hashes = read_row_hashes(storage, table, frag, label_array)
    labels = None
    if label_array in frag["arrays"]:
        m = frag["arrays"][label_array]
        labels = arrays.read(arrays.open_array(storage, f"{table}/{safe_relpath(m['path'])}"), path=m["path"])
        if arrays.content_digest(labels) != m["sha256"]:
            raise LakeError(f"lake array {m['path']} does not match the digest in its commit record: the data was "
                            "modified after commit; run `lepton-jax lake verify`")
    _remember(key, (hashes, labels))
    return hashes, labels


def content_sha256(storage: Storage, table: str, fragments: list[dict[str, Any]], label_array: str = LABEL) -> str:
    """The split's logical content digest of ``lepton-lake/2`` and ``/3`` records: sha256 over every row hash in
    order, and over the label array's bytes (``lepton-lake/4``: :func:`content_chain`)."""
    def read(frag: dict[str, Any]) -> tuple[bytes, bytes]:
        hashes, labels = fragment_keys(storage, table, frag, label_array)
        return hashes.tobytes(), b"" if labels is None else np.ascontiguousarray(labels).tobytes()

    rows, labels = hashlib.sha256(), hashlib.sha256()
    # fragments are read on threads, a few ahead of the one hashed (opening an array is mostly waiting)
    with ThreadPoolExecutor(max_workers=CONTENT_READERS) as pool:
        for row_bytes, label_bytes in read_ahead(pool, read, fragments, 2 * CONTENT_READERS):
            rows.update(row_bytes)
            labels.update(label_bytes)
    return hashlib.sha256(rows.digest() + labels.digest()).hexdigest()


def read_ahead(pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """``fn(item)`` of every item in order, run on ``pool`` with at most ``ahead`` items submitted beyond the one
    yielded (bounded memory)."""
    pending: collections.deque[Future] = collections.deque()
    it = iter(items)
    for item in itertools.islice(it, ahead):
        pending.append(pool.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        item = next(it, None)
        if item is not None:
            pending.append(pool.submit(fn, item))
        yield result


def _fragment_rows(storage: Storage, table: str, fragments: list[dict[str, Any]], label_array: str
                   ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Each fragment's ``(row hashes, labels as int64)`` in order (-1 labels without a label array), read on
    threads a few fragments ahead of the one yielded (opening an array is mostly waiting)."""
    def read(frag: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        hashes, labels = fragment_keys(storage, table, frag, label_array)
        return hashes, (np.full(hashes.shape[0], -1, np.int64) if labels is None else labels.astype(np.int64))

    with ThreadPoolExecutor(max_workers=CONTENT_READERS) as pool:
        yield from read_ahead(pool, read, fragments, 2 * CONTENT_READERS)


def content_chain(storage: Storage, table: str, fragments: list[dict[str, Any]], label_array: str = LABEL,
                  extends: dict[str, Any] | None = None) -> dict[str, Any]:
    """A split's logical content digest as a chain (``lepton-lake/4``): ``{"content_sha256", "content_chain"}``.

    The rows (row hash, label as int64) in order are cut into links of :data:`CHAIN_ROWS`; each full link's state is
    ``sha256(previous state + its hashes + its labels)`` from 32 zero bytes; ``content_sha256`` is the sha256 of the
    last state, the rows after the last full link (the *tail*, kept in the record) and the row count. The same rows
    in the same order give the same digest however they are cut into fragments, and a split that extends the split
    entry ``extends`` (its fragments first, then more) continues its chain from the record: an append reads none of
    the rows the table already holds."""
    state, rows = bytes(32), 0
    tail_h, tail_l = np.zeros((0, 32), np.uint8), np.zeros(0, np.int64)
    old = extends.get("content_chain") if extends else None
    start = 0
    if old is not None and old.get("link_rows") == CHAIN_ROWS:
        before = [f["path"] for f in split_fragments(extends)]
        if before == [f["path"] for f in fragments[:len(before)]]:
            state, rows, start = bytes.fromhex(old["state"]), int(old["rows"]), len(before)
            tail_h = np.frombuffer(bytes.fromhex(old["tail_row_hashes"]), np.uint8).reshape(-1, 32)
            tail_l = np.asarray(old["tail_labels"], np.int64).reshape(-1)
    sha256 = hashlib.sha256
    for hashes, labels in _fragment_rows(storage, table, fragments[start:], label_array):
        h, lab = np.concatenate([tail_h, hashes]), np.concatenate([tail_l, labels])
        full = h.shape[0] // CHAIN_ROWS * CHAIN_ROWS
        hb = memoryview(np.ascontiguousarray(h[:full]).reshape(-1))
        lb = memoryview(lab[:full].astype("<i8").view(np.uint8))  # bytes, as the slices below count
        hw, lw = CHAIN_ROWS * 32, CHAIN_ROWS * 8
        for k in range(full // CHAIN_ROWS):
            state = sha256(state + hb[k * hw:(k + 1) * hw] + lb[k * lw:(k + 1) * lw]).digest()
        rows += full
        tail_h, tail_l = h[full:], lab[full:]
    total = rows + tail_h.shape[0]
    digest = sha256(state + np.ascontiguousarray(tail_h).tobytes() + tail_l.astype("<i8").tobytes()
                    + total.to_bytes(8, "little")).hexdigest()
    return {"content_sha256": digest,
            "content_chain": {"link_rows": CHAIN_ROWS, "rows": rows, "state": state.hex(),
                              "tail_row_hashes": np.ascontiguousarray(tail_h).tobytes().hex(),
                              "tail_labels": tail_l.tolist()}}


def content_matches(storage: Storage, table: str, fragments: list[dict[str, Any]], entry: dict[str, Any],
                    label_array: str = LABEL) -> bool:
    """Whether ``fragments`` hold the content the split entry ``entry`` records, by the digest its format uses
    (the chain with its stored state and tail, or the older :func:`content_sha256`)."""
    if "content_chain" in entry:
        got = content_chain(storage, table, fragments, label_array)
        return got["content_sha256"] == entry["content_sha256"] and got["content_chain"] == entry["content_chain"]
    return content_sha256(storage, table, fragments, label_array) == entry.get("content_sha256")


def commit_dirs(record: dict[str, Any]) -> set[str]:
    """The ``data/<commit-id>`` directories a record references (fragments of any commit, quarantine)."""
    paths = []
    for entry in record.get("splits", {}).values():
        paths += [m["path"] for frag in split_fragments(entry) for m in frag["arrays"].values()]
    q = record.get("quarantine") or {}
    if q.get("entries"):
        paths.append(q["entries"]["path"])
    for frag in q.get("fragments", []):
        paths += [m["path"] for m in frag["arrays"].values()]
    paths += [m["path"] for m in (q.get("arrays") or {}).values()]
    return {p.split("/")[1] for p in paths if p.count("/") >= 1}
