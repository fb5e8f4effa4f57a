"""Exceptions raised by timemachine.

Every error derives from :class:`TimemachineError` and from the matching builtin, so
``except ValueError`` keeps working for callers that do not know this package.
"""


class TimemachineError(Exception):
    """Base class of every error this package raises."""


class InputError(TimemachineError, ValueError):
    """A value given by the caller is invalid (wrong shape, NaN, out of range...)."""


class ForceFieldError(TimemachineError, ValueError):
    """A force field or structure could not be turned into a System."""


class MissingFileError(TimemachineError, FileNotFoundError):
    """A file the caller named does not exist."""


class SimulationError(TimemachineError, RuntimeError):
    """A run went bad (NaN coordinates, exploding sensitivities)."""


class CheckpointError(InputError):
    """A checkpoint cannot be resumed: it was written by another run (a different system,
    parameter set or configuration: the message names what differs) or is not a
    timemachine checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file on disk fails its SHA-256 check or cannot be parsed (truncated,
    bit-flipped or hand-edited); the message names the file."""


class TimemachineWarning(UserWarning):
    """Base class of the warnings this package issues."""


class CheckpointFallbackWarning(TimemachineWarning):
    """A run resumed from the previous good checkpoint because the last one was unusable;
    the message names both files."""
