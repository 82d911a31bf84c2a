"""``UserError``: the base of every error that is the user's to fix (a config, a directory, a model, a run).

The command-line tools end on one of these with its message and exit code 2, never a traceback; any other
exception is a bug and keeps its traceback. Each project error also keeps its historical base (``ValueError``,
``RuntimeError`` ...), so ``except ValueError`` and the like keep catching it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says which file, field or setting and what to do about it."""
