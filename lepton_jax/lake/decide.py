"""An ingest's decisions across chunks (:class:`Driver`): in chunk order, against the on-disk hash index of the
rows seen so far and of the table an append extends, each chunk's rows are kept or quarantined (``duplicate``,
``conflicting_labels``, ``leak``); fragments that lose rows to a later decision are rewritten, and the result is the
commit plan :mod:`lepton_jax.lake.ingest` publishes. The decisions do not depend on how many workers wrote the
chunks."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake.fragments import LABEL, fragment_keys, fragment_row_keys, read_row_hashes, row_hash_field
from lepton_jax.lake.index import CONFLICT, NEW, TABLE, HashIndex
from lepton_jax.lake.store import DATA_DIR, QUARANTINE, Lake, SplitReader, TableVersion


def index_table(index: HashIndex, base: TableVersion) -> None:
    """Loads the hashes the table holds as the starting index: each fragment's 8-byte row-hash keys
    (:func:`~lepton_jax.lake.fragments.fragment_row_keys`: a quarter of its hash file), never its example arrays;
    a fragment's full row hashes and labels are read only when one of its keys matches an appended row."""
    label_array = base.schema.get("label_array", LABEL)
    storage = base.lake.storage

    def load(frag: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        hashes, labels = fragment_keys(storage, base.table, frag, label_array)
        return hashes, labels if labels is not None else np.full(len(hashes), -1)

    for split in base.splits:
        for frag in base.fragments(split):
            index.add_table_keys(fragment_row_keys(storage, base.table, frag, label_array), split,
                                 functools.partial(load, frag))


class Driver:
    """Cross-chunk decisions in chunk order, against the on-disk index; then the rewrites they need."""

    def __init__(self, lake: Lake, table: str, commit_id: str, index: HashIndex, base: TableVersion | None, *,
                 row_hash: str):
        self.lake, self.table, self.commit_id, self.index, self.base = lake, table, commit_id, index, base
        self.row_hash = row_hash  # the table's (every fragment of this commit's)
        self.fragments: list[tuple[str, dict[str, Any]]] = []  # (split, entry) in order
        self.drops: dict[int, dict[int, tuple[str, str, int, str]]] = {}  # fragment -> row -> rejection
        self.entries: list[dict[str, Any]] = []
        self.late: list[dict[str, Any]] = []  # rejections decided here (rows written by a worker)
        self.q_fragments: list[dict[str, Any]] = []
        self.q_rows = 0
        self.offset = 0
        self.examples_in = 0
        self.digests: list[str] = []
        self.first: dict[str, Any] | None = None
        self.names: list[str] = []
        self.ranges: dict[str, list[float]] = {}
        self.column_ranges: dict[str, np.ndarray] = {}
        self.column_names: dict[str, list[str]] = {}
        self.source_split: bool | None = None

    def add(self, r: dict[str, Any]) -> None:
        if self.first is None:
            self.first = r
        elif r["arrays"] != self.first["arrays"]:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} has arrays {r['arrays']}, the first chunk "
                            f"{self.first['arrays']}; every example must have one shape and dtype")
        longer, shorter = sorted((self.names, r["names"]), key=len, reverse=True)
        if longer[:len(shorter)] != shorter:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} has label names {r['names']}, earlier chunks "
                            f"{self.names}")
        self.names = list(longer)
        if self.source_split is None:
            self.source_split = r["source_split"]
        elif self.source_split != r["source_split"]:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} disagrees with earlier chunks on whether the "
                            "source assigns splits")
        for k, (lo, hi) in r["ranges"].items():
            have = self.ranges.setdefault(k, [lo, hi])
            have[0], have[1] = min(have[0], lo), max(have[1], hi)
        if set(r["column_ranges"]) != set(self.first["column_ranges"]):
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} declares column ranges for "
                            f"{sorted(r['column_ranges'])}, the first chunk for {sorted(self.first['column_ranges'])}")
        for k, cols in r["column_ranges"].items():
            have_cols = self.column_ranges.get(k)
            self.column_ranges[k] = cols.copy() if have_cols is None else np.stack(
                [np.minimum(have_cols[:, 0], cols[:, 0]), np.maximum(have_cols[:, 1], cols[:, 1])], axis=1)
        for k, names in r["column_names"].items():
            self.column_names.setdefault(k, names)
        self.digests.append(r["digest"])
        self.examples_in += r["n"] + r["n_source_rejected"]
        offset = self.offset
        for e in r["entries"]:
            self.entries.append({**e, "index": None if e["index"] is None else e["index"] + offset})
        if r["q_arrays"] is not None:
            q = dict(r["q_arrays"])
            q["source_index"] = q["source_index"] + offset
            rows = {int(i): self.q_rows + k for k, i in enumerate(q["source_index"])}
            for e in self.entries[len(self.entries) - len(r["entries"]):]:
                if e["index"] is not None:
                    e["row"] = rows[e["index"]]
            self._write_quarantine_fragment(q)
        for split, f in r["fragments"].items():
            fid = len(self.fragments)
            self.fragments.append((split, f["entry"]))
            self._decide(fid, split, f, offset, r["has_ids"])
        self.offset += r["n"]

    def _decide(self, fid: int, split: str, f: dict[str, Any], offset: int, has_ids: bool) -> None:
        """Drops the fragment's rows whose content the index holds (duplicate, conflicting label, leak) and adds the
        others. The rows' hashes are distinct (the chunk was deduplicated on its own), so one lookup serves all."""
        hashes, labels = f["hashes"], np.asarray(f["labels"], np.int64)
        sources = np.asarray(f["source"], np.int64) + offset
        ids = f["ids"]
        found = self.index.lookup(hashes)
        for row in np.flatnonzero(found >= 0):  # few: only content seen before
            hit = self.index.record(int(found[row]))
            h = hashes[row].tobytes()
            label, source = int(labels[row]), int(sources[row])
            ident = ids[int(f["source"][row])] if ids is not None else f"example {source}"
            where = (f"{hit.ident}" if hit.state != TABLE else
                     f"an example of {self.table}@{self.base.version} split {hit.split!r}")
            if hit.state == CONFLICT or hit.label != label:
                reason, detail = "conflicting_labels", f"{ident}: the same content as {where} with another label"
                if hit.state == NEW:
                    self.index.mark_conflict(int(found[row]))
                    self._drop(hit.fragment, hit.row, "conflicting_labels",
                               f"{hit.ident}: the same content as {ident} with another label", hit.index, hit.ident,
                               h, hit.label)
            elif self.source_split and hit.split != split:
                reason, detail = "leak", f"{ident} in split {split!r} has the same content as {where} in split " \
                                         f"{hit.split!r}"
            else:
                reason, detail = "duplicate", f"{ident} duplicates {where}"
            self._drop(fid, int(row), reason, detail, source, ident, h, label)
        new = np.flatnonzero(found < 0)
        self.index.add(hashes[new], labels[new], split, NEW, fid, new, sources[new], ids,
                       np.asarray(f["source"], np.int64)[new])

    def _drop(self, fid: int, row: int, reason: str, detail: str, source: int, ident: str, h: bytes,
              label: int) -> None:
        self.drops.setdefault(fid, {})[row] = source
        self.late.append({"fid": fid, "row": row, "reason": reason, "detail": detail, "index": source, "id": ident,
                          "hash": h, "label": label})

    def _write_quarantine_fragment(self, named: dict[str, np.ndarray]) -> None:
        rel = f"{DATA_DIR}/{self.commit_id}/{QUARANTINE}/{len(self.q_fragments):06d}"
        self.q_fragments.append(self.lake.write_fragment(self.table, rel, named, row_hash=self.row_hash))
        self.q_rows += int(named["label"].shape[0])

    def finish(self) -> dict[str, Any]:
        """Rewrites fragments that lost rows to a later decision, and returns the commit plan."""
        if self.first is None:
            raise LakeError("the source yielded no chunks")
        rewritten: dict[int, dict[str, Any] | None] = {}
        q_named: list[dict[str, np.ndarray]] = []
        where: dict[tuple[int, int], int] = {}
        q_row = self.q_rows
        for fid, rows in sorted(self.drops.items()):
            split, entry = self.fragments[fid]
            hashes = read_row_hashes(self.lake.storage, self.table, entry)
            data = SplitReader(self.lake.uri, self.table, 0, split, {"fragments": [entry]}).read()
            mask = np.ones(hashes.shape[0], dtype=bool)
            mask[list(rows)] = False
            dropped = np.flatnonzero(~mask)
            q = {k: v[dropped] for k, v in data.items()}
            q["source_index"] = np.asarray([rows[int(i)] for i in dropped], dtype=np.int64)
            for k, i in enumerate(dropped):
                where[(fid, int(i))] = q_row + k
            q_row += dropped.size
            q_named.append(q)
            self.lake.storage.delete_prefix(f"{self.table}/{entry['path']}")
            rewritten[fid] = (self.lake.write_fragment(self.table, entry["path"] + "r",
                                                       {k: v[mask] for k, v in data.items()}, hashes=hashes[mask],
                                                       row_hash=self.row_hash)
                              if mask.any() else None)
        if q_named:
            self._write_quarantine_fragment({k: np.concatenate([q[k] for q in q_named]) for k in q_named[0]})
        names = self.names
        for e in self.late:
            self.entries.append({"id": e["id"], "index": e["index"], "reason": e["reason"], "detail": e["detail"],
                                 **row_hash_field(self.row_hash, e["hash"]), "row": where[(e["fid"], e["row"])],
                                 "label": names[e["label"]] if 0 <= e["label"] < len(names) else None})
        fragments: dict[str, list[dict[str, Any]]] = {}
        for fid, (split, entry) in enumerate(self.fragments):
            entry = rewritten.get(fid, entry)
            if entry is not None:
                fragments.setdefault(split, []).append(entry)
        quarantine = self.lake.write_quarantine_entries(self.table, self.commit_id, self.entries)
        if self.q_fragments:
            quarantine["fragments"] = self.q_fragments
            quarantine["num_rows"] = self.q_rows
        kept = sum(int(f["num_examples"]) for fs in fragments.values() for f in fs)
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        cleaning = {"examples_in": self.examples_in, "examples_out": kept, "quarantined": len(self.entries),
                    **dict(sorted(counts.items()))}
        first = self.first
        ranges = {k: [float(v) for v in r] for k, r in self.ranges.items()}
        schema = {"arrays": {name: {"dtype": dtype, "example_shape": shape, "value_range": ranges[name]}
                             for name, (dtype, shape) in first["arrays"].items()},
                  "label_array": "label", "label_names": names}
        if first["targets"]:  # non-class targets (regression): not model inputs
            schema["target_arrays"] = list(first["targets"])
        for name, cols in self.column_ranges.items():  # tabular arrays: scaled and validated per column
            schema["arrays"][name]["column_ranges"] = cols.tolist()
            if name in self.column_names:
                schema["arrays"][name]["columns"] = self.column_names[name]
        digest = self.digests[0] if len(self.digests) == 1 else hashlib.sha256(
            "".join(self.digests).encode()).hexdigest()
        return {"commit_id": self.commit_id, "fragments": fragments, "quarantine": quarantine,
                "cleaning": cleaning, "kept": kept, "schema": schema, "digest": digest, "chunks": len(self.digests),
                "uri": first["uri"], "transforms": first["transforms"], "source_split": bool(self.source_split)}
