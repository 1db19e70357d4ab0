"""Lake roots: which locations a lake may live at.

Today a lake is a local directory (a path, or a ``file://`` URI). Object-store roots (``s3://``, ``gs://``) are
planned (issue 13) but not implemented yet, so they — and any other ``scheme:`` prefix — are refused with one line
rather than silently becoming a local directory named ``s3:``.
"""

from __future__ import annotations

import re
from pathlib import Path

from lepton_jax.errors import LakeError

SUPPORTED = "a local directory path (or file:///abs/path)"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def local_root(root: str | Path) -> Path:
    """The local directory of a lake root; raises :class:`LakeError` for a URI of an unsupported scheme."""
    if isinstance(root, Path):
        return root
    text = str(root)
    m = _SCHEME.match(text)
    if m is None:
        return Path(text)
    scheme = m.group(1).lower()
    if scheme == "file" and text.startswith("file://"):
        rest = text[len("file://"):]
        if not rest.startswith("/"):
            raise LakeError(f"lake root {text!r}: a file:// URI needs an absolute path (file:///abs/path)")
        return Path(rest)
    hint = " (object-store lakes are not implemented yet)" if scheme in ("s3", "gs", "gcs", "memory") else ""
    raise LakeError(f"lake root {text!r}: scheme {scheme!r} is not supported{hint}; "
                    f"supported: {SUPPORTED} (use ./{text} for a directory whose name contains ':')")
