"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class TrainrigError(Exception):
    """Bad input the user can fix (config, files, data); never a bug in trainrig."""


class ConfigError(TrainrigError):
    """A config key, type or value is wrong."""


class DataError(TrainrigError):
    """Dataset files are missing or malformed."""


class CheckpointError(TrainrigError):
    """A checkpoint or weights file is missing, unreadable or does not fit the model."""


class OutOfMemory(TrainrigError):
    """Out of memory even at micro-batch 1 (or for every batch size tried)."""


class CudaFailure(TrainrigError):
    """A known opaque CUDA failure (cuDNN init, device-side assert), re-raised with its usual cause."""


class RunFailed(Exception):
    """The run failed for a reason outside the user's input (a rank died or stalled, the group did not form):
    the CLI prints the message on one line and exits with code 1."""
