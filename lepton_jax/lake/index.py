"""The content-hash index of an ingest: exact dedup and the leak check across a whole dataset in bounded memory.

One row per kept example content (sha256 of its arrays), on disk in SQLite (a B-tree sorted by hash, with a bounded
page cache), so memory does not grow with the dataset. An append first loads the hashes the table already holds
(from its fragments' row-hash files), so appended data is checked against the table as well as against itself.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

TABLE, NEW, CONFLICT = 0, 1, 2  # where a hash's kept copy lives: the table already, this ingest, or nowhere (conflict)
_BATCH = 500


class Hit(NamedTuple):
    label: int
    split: str
    state: int
    fragment: int
    row: int
    index: int
    ident: str


class HashIndex:
    """``hash -> (label, split, state, fragment, row, source index, id)`` in a temporary SQLite file under
    ``directory`` (default: the system's temp directory)."""

    def __init__(self, directory: str | Path | None = None, cache_mib: int = 32):
        self._dir = tempfile.TemporaryDirectory(prefix="lake-index-", dir=directory)
        self.db = sqlite3.connect(Path(self._dir.name) / "index.sqlite")
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{int(cache_mib) * 1024}",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE idx (h BLOB PRIMARY KEY, label INT, split TEXT, state INT, frag INT, "
                        "row INT, source INT, ident TEXT) WITHOUT ROWID")

    def lookup(self, hashes: Iterable[bytes]) -> dict[bytes, Hit]:
        """The entries of those ``hashes`` that the index holds."""
        hashes = list(hashes)
        out: dict[bytes, Hit] = {}
        for start in range(0, len(hashes), _BATCH):
            part = hashes[start:start + _BATCH]
            marks = ",".join("?" * len(part))
            for h, *rest in self.db.execute(f"SELECT h, label, split, state, frag, row, source, ident FROM idx "
                                            f"WHERE h IN ({marks})", part):
                out[bytes(h)] = Hit(*rest)
        return out

    def add(self, rows: Iterable[tuple[bytes, int, str, int, int, int, int, str]]) -> None:
        """Inserts ``(hash, label, split, state, fragment, row, source index, id)`` rows (hashes must be new)."""
        self.db.executemany("INSERT INTO idx VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def mark_conflict(self, h: bytes) -> None:
        self.db.execute("UPDATE idx SET state = ? WHERE h = ?", (CONFLICT, h))

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM idx").fetchone()[0])

    def splits_of(self) -> Iterator[tuple[str, int]]:
        """``(split, count)`` of kept hashes (for the leak assertion: each hash has exactly one split)."""
        yield from self.db.execute("SELECT split, COUNT(*) FROM idx WHERE state != ? GROUP BY split", (CONFLICT,))

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> HashIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
