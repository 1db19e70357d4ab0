"""Parameter trees stored in the lake: moved to :mod:`lepton_jax.model_store` (below ``train``, which reads them to
fine-tune); these names stay importable from here."""

from lepton_jax.model_store import (
    FORMAT,
    ParamsError,
    delete_tree,
    read_leaves,
    read_tree,
    tree_digest,
    tree_leaves,
    write_tree,
)

__all__ = ["FORMAT", "ParamsError", "delete_tree", "read_leaves", "read_tree", "tree_digest", "tree_leaves",
           "write_tree"]
