"""Errors a user can fix: the command prints them as one `error: ...` line, exit status 2.

Everything else (a bug, a library failure) keeps its traceback.
"""


class UserError(Exception):
  """A bad setting, input or workdir; the message says what and where."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (checked before any data or compilation)."""


class MissingCheckpointError(UserError, FileNotFoundError):
  """A read-only mode found no committed checkpoint to use."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient norm (nothing was saved after it)."""
