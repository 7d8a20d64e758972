"""Exception hierarchy of gradleak.

Every error a user can cause by bad input derives from :class:`GradleakError`, and carries a
one-line message of the form "expected X, got Y". The command line turns these into exit code 2
without a traceback.
"""

from __future__ import annotations


class GradleakError(Exception):
    """Base class of every error gradleak raises on purpose."""


class ConfigError(GradleakError, ValueError):
    """A configuration value, preset or command-line option is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup named something that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UpdateError(GradleakError, ValueError):
    """A client update is malformed, truncated, non-finite, or does not fit the model."""


class UnsupportedModelError(GradleakError, ValueError):
    """The victim model does not meet what an attack or a label strategy assumes."""


class DataError(GradleakError, ValueError):
    """A dataset or image is missing, of the wrong size, or of the wrong range."""


class CheckpointError(GradleakError, ValueError):
    """A checkpoint or run folder cannot be resumed."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a job scheduler's or ``kill``'s stop) during an attack's steps, raised once the step
    in progress has ended and been checkpointed, where a Ctrl-C raises KeyboardInterrupt. Not a
    :class:`GradleakError`: like KeyboardInterrupt, it is a stop, not a failure."""
