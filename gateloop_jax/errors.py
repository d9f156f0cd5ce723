"""User errors: a mistake in what was asked for (a setting, a path), as opposed to a bug.

Library functions raise these like any other exception (they are ValueError / FileNotFoundError subclasses, so
`except ValueError` keeps working); the command lines (gateloop_jax/cli.py) answer them with one line on stderr and
exit status 2 instead of a traceback. Every message names the field, the value and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Marker of every mistake of the user's; the command lines print its message as one line."""


class ConfigError(UserError, ValueError):
    """A setting (config field, flag, argument) with a value that cannot run."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the settings name does not exist (or is of the wrong kind)."""
