"""Errors a user can act on.

Every expected failure (bad data, a bad recipe or config value, a missing or corrupt checkpoint, a reward or
server that cannot be used) raises a :class:`UserError`. The command line prints it as one line on stderr and
exits with code 2; any other exception is a bug and keeps its traceback (``--debug`` shows the traceback of a
``UserError`` too). Subclasses say which kind of input was wrong; their messages name the record, key, file or
reward involved and, where there is one, what would work instead.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by the user's input; printed without a traceback (exit code 2)."""


class ConfigError(UserError, ValueError):
    """A recipe key or config value is wrong (unknown key, value out of range, incompatible settings)."""


class DataError(UserError, ValueError):
    """The data cannot be used (missing file, unreadable image, bad record)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete or corrupt."""


class RewardError(UserError, ValueError):
    """A reward cannot be built or has failed in a way training cannot go on from."""


class NumericsError(UserError, FloatingPointError):
    """The model produced non-finite values (NaN or inf): a dtype, attention kernel or learning rate to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (model, transformer, checkpoint) does not exist or lacks a part."""
