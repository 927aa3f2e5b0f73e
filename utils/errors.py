"""The common base of the framework's own errors: a mistake in the user's input (a config value, a file, a
command-line argument), not a bug. Entry points print these as one line `error: ...` and exit 2
(see utils/cli.py); every other exception keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the key or file and what to do."""


class InputError(UserError, ValueError):
    """A command-line argument or input file that cannot be used (not a config, dataset or checkpoint)."""
