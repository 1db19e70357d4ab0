"""Commit records: the one format readers, writers and maintenance share.

A table version is one JSON record at ``<table>/_log/<version:08d>.json`` (see :mod:`lepton_jax.lake.store` for
what it holds). Formats: ``lepton-lake/1`` (one array per split), ``lepton-lake/2`` (fragments) and
``lepton-lake/3`` (``lepton-lake/2`` plus ``record_sha256``: the sha256 of the record's own canonical JSON without
that field, so an edited record — reversed label names, a split's example count changed — is an error naming it,
for every reader and for ``verify``) and ``lepton-lake/4`` (``/3`` with each split's content digest as a chain,
``fragments.content_chain``, that an append continues from the record, and row-hash files whose entry says
``"layout": "keys-first"``) and ``lepton-lake/5`` (``/4`` with fragments whose row-hash entry names another hash
than sha256, ``"hash": "xxh3_128"``: code that knows only ``/4`` refuses such a record rather than check its rows
with sha256; a record whose row hashes are all sha256 stays ``/4``). Records of the older formats still read (``/1``
and ``/2`` carry no digest).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lepton_jax.errors import LakeError

FORMAT = "lepton-lake/5"
SHA256_ROWS_FORMAT = "lepton-lake/4"  # a record whose fragments' row hashes are all sha256
# 1: one array per split, no fragments; 2: no record digest; 3: each split's content_sha256 over all its rows at once
FORMATS = ("lepton-lake/1", "lepton-lake/2", "lepton-lake/3", SHA256_ROWS_FORMAT, FORMAT)
SEALED_FORMATS = ("lepton-lake/3", SHA256_ROWS_FORMAT, FORMAT)  # formats whose records must carry their own digest
DIGEST_FIELD = "record_sha256"
LOG_DIR = "_log"
DATA_DIR = "data"
QUARANTINE = "_quarantine"
TEMP_PREFIX = ".commit-"  # _log/.commit-<commit-id>-<random>: a record's temp file while it is published
USED_DIR = "_used"  # _log/_used/<version>: an empty marker per version number ever published (never reused)
LEASE_DIR = "_leases"  # _leases/<commit-id>.json: a writer's lease on its commit directory, held until it published


def record_key(table: str, version: int) -> str:
    """The storage key of ``table``'s record of ``version``."""
    return f"{table}/{LOG_DIR}/{version:08d}.json"


def record_digest(record: dict[str, Any]) -> str:
    """sha256 of ``record``'s canonical JSON (sorted keys, no whitespace), without :data:`DIGEST_FIELD`."""
    body = {k: v for k, v in record.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_format(record: dict[str, Any]) -> str:
    """The format a new ``record`` is written in: :data:`FORMAT` if a fragment's row hashes name a hash other than
    sha256, else :data:`SHA256_ROWS_FORMAT`."""
    parts = [*record.get("splits", {}).values(), record.get("quarantine") or {}]
    named = {(f.get("row_hashes") or {}).get("hash", "sha256") for p in parts for f in p.get("fragments", [])}
    return FORMAT if named - {"sha256"} else SHA256_ROWS_FORMAT


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` in the current format (``/5``, or ``/4`` when all its row hashes are sha256) with its own digest
    added."""
    body = {**{k: v for k, v in record.items() if k != DIGEST_FIELD}, "format": record_format(record)}
    return {**body, DIGEST_FIELD: record_digest(body)}


def encode(record: dict[str, Any]) -> bytes:
    """The bytes published for ``record``: compact JSON with sorted keys (json's C encoder; indenting falls back to
    its pure-Python one, 44 ms of a 1% append to a 1M-row table under cProfile); ``python -m json.tool`` indents
    one for reading."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def parse(payload: bytes, version: int, where: str) -> dict[str, Any]:
    """The record in ``payload`` (read from ``where``) for ``version``, checked: a known format, the version it is
    filed under and, for sealed formats, its own digest. Anything else is a LakeError naming ``where``."""
    try:
        record = json.loads(payload)
    except ValueError as e:
        raise LakeError(f"commit record {where} is unreadable ({e}); the lake is corrupt") from e
    if not isinstance(record, dict) or record.get("format") not in FORMATS or record.get("version") != version:
        raise LakeError(f"commit record {where} is not a lepton-lake record (formats {', '.join(FORMATS)}) for "
                        f"version {version}")
    sealed = record["format"] in SEALED_FORMATS or DIGEST_FIELD in record
    if sealed and record.get(DIGEST_FIELD) != record_digest(record):
        raise LakeError(f"commit record {where} does not match its own digest ({DIGEST_FIELD}): it was edited "
                            "after it was published; restore it from a backup or re-ingest the source")
    return record
