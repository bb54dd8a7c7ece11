"""The harness's own error types. A CLI catches these (and ``variants.ConfigError``) and prints
the message; anything else is a bug and shows its traceback."""
from __future__ import annotations


class HarnessError(Exception):
    """Something the user can fix (bad input, a setting this machine cannot run); the message says
    what is wrong and where."""


class DataError(HarnessError, ValueError):
    """Bad input data: the message names the file and what is wrong."""


class GridError(HarnessError, ValueError):
    """A bad grid file: the message names the file and the key."""
