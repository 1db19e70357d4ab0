"""Device meshes and shardings."""

from lepton_jax.parallel.mesh import batch_sharding, make_mesh, replicated

__all__ = ["batch_sharding", "make_mesh", "replicated"]
