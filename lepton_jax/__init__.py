"""lepton_jax: data lake -> sharded training -> robust optimisation -> serving, on JAX."""

from lepton_jax.errors import LeptonError

__all__ = ["LeptonError"]
__version__ = "0.1.0"
