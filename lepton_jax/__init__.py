"""lepton_jax: data lake -> sharded training -> robust optimisation -> serving, on JAX."""

from importlib.metadata import PackageNotFoundError, version

from lepton_jax.errors import LeptonError

try:
    __version__ = version("lepton_jax")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0.0.0+unknown"

__all__ = ["LeptonError", "__version__"]
