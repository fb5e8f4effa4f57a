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
