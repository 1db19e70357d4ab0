"""User-facing errors: each names the bad input and what was expected.

The CLI prints ``error: <message>`` for any :class:`LeptonError` and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class LeptonError(Exception):
    """Base class for errors caused by user input (config, files, data), not by bugs."""


class ConfigError(LeptonError):
    """A config file or override is invalid."""


class LakeError(LeptonError):
    """A lake, table, version or array is missing, corrupt, or would be written inconsistently."""


class CommitConflictError(LakeError):
    """Another writer published the same table version first."""


class RegistryError(LeptonError):
    """A model name, version or stage is invalid or unknown."""


class CheckpointError(LeptonError):
    """A checkpoint is missing, corrupt or does not match the model."""


class InputError(LeptonError):
    """An input file for prediction has the wrong shape, dtype or values."""


class TrainingDivergedError(LeptonError):
    """The training loss became NaN or inf."""
