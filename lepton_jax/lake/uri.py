"""Lake roots: which locations a lake may live at.

A lake root is a local directory (a path, or a ``file://`` URI), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
Any other ``scheme:`` prefix is refused with one line rather than silently becoming a local directory named ``s3:``.
"""

from __future__ import annotations

import re
from pathlib import Path

from lepton_jax.errors import LakeError

SUPPORTED = "a local directory path (or file:///abs/path), s3://bucket/prefix or gs://bucket/prefix"
OBJECT_SCHEMES = ("s3", "gs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,221}[a-z0-9]$")


def parse_root(root: str | Path) -> tuple[str, Path | str]:
    """``("file", Path)`` for a local root, ``("s3" | "gs", "bucket/prefix")`` for an object-store root; raises
    :class:`LakeError` for a URI of an unsupported scheme or without a bucket."""
    if isinstance(root, Path):
        return "file", root
    text = str(root)
    m = _SCHEME.match(text)
    if m is None:
        return "file", Path(text)
    scheme = m.group(1).lower()
    if scheme == "file" and text.startswith("file://"):
        rest = text[len("file://"):]
        if not rest.startswith("/"):
            raise LakeError(f"lake root {text!r}: a file:// URI needs an absolute path (file:///abs/path)")
        return "file", Path(rest)
    if scheme in ("gcs",):
        scheme = "gs"
    if scheme in OBJECT_SCHEMES and text[m.end():].startswith("//"):
        location = text[m.end() + 2:].strip("/")
        bucket = location.split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise LakeError(f"lake root {text!r}: {bucket!r} is not a bucket name; use {scheme}://bucket/prefix")
        if any(p in (".", "..") for p in location.split("/")[1:]):
            raise LakeError(f"lake root {text!r}: the prefix may not contain '.' or '..' components")
        return scheme, location
    raise LakeError(f"lake root {text!r}: scheme {scheme!r} is not supported; "
                    f"supported: {SUPPORTED} (use ./{text} for a directory whose name contains ':')")
