"""What every command line shares: a user's mistake is answered in one line, a bug keeps its traceback.

A mistake (gateloop_jax.errors.UserError, a flag that does not parse, an unknown --config.<field>) prints
`<prog>: error: <what, the value, the fix>` on stderr and exits with status 2, before anything is computed.
Any other exception is a bug and propagates with its full traceback. `--debug` (or GATELOOP_DEBUG=1) shows the
traceback of user errors too.

    cli.run_absl(main, prog="gateloop_jax.main")     # absl commands (flags, --config files)
    cli.run_argparse(main, prog=..., argv=None)      # argparse commands; build the parser with cli.ArgumentParser
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, NoReturn, Sequence

from gateloop_jax.errors import UserError

DEBUG_ENV = "GATELOOP_DEBUG"
EXIT_USER_ERROR = 2


def debug_requested(argv: Sequence[str]) -> bool:
    """True when --debug is on the command line or GATELOOP_DEBUG is set to anything but 0 / empty."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0") or any(a in ("--debug", "-debug") for a in argv)


def one_line(message: str) -> str:
    """The message with its line breaks and indentation folded into single spaces."""
    return " ".join(str(message).split())


def exit_user_error(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _chain(error: BaseException) -> list[BaseException]:
    """error, then the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def innermost_user_error(error: BaseException) -> UserError | None:
    """The deepest UserError of the chain (flag parsers re-raise ours wrapped in their own types)."""
    found = [e for e in _chain(error) if isinstance(e, UserError)]
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# --config.<field> overrides (ml_collections raises a bare AttributeError / KeyError naming only the last key)


def unknown_field_message(config, path: str, flag: str = "config") -> str | None:
    """One line naming the first key of `path` (e.g. "mesh.bogus_axis") that `config` lacks, with close matches;
    None when the whole path exists."""
    from ml_collections import ConfigDict

    node, walked = config, [flag]
    for key in path.split("."):
        where = ".".join(walked)
        if not isinstance(node, ConfigDict):
            kind = type(node).__name__
            return f"--{flag}.{path}: --{where} is a value ({kind}), not a group of fields; set --{where}."
        if key not in node:
            fields = sorted(node.keys())
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
            hint = (
                ("did you mean " + " or ".join(f"--{where}.{c}" for c in close) + "?")
                if close
                else f"the fields of --{where} are {', '.join(fields)}."
            )
            return f"--{flag}.{path}: --{where} has no field {key!r}; {hint}"
        node = node[key]
        walked.append(key)
    return None


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of --name=V / --name V in argv (the last one wins, as in absl)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _override_paths(argv: Sequence[str], flag: str) -> list[str]:
    prefix = f"--{flag}."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def config_override_message(argv: Sequence[str], flag: str = "config") -> str | None:
    """The one-line answer to an unknown --config.<field> in argv, by loading the config file again (cheap: a
    get_config call) and walking each override's path; None if every path exists (so the error was another)."""
    from ml_collections.config_flags import config_flags

    path = _flag_value(argv, flag)
    if path is None:
        return None
    try:
        config = config_flags.ConfigFileFlagParser(name=flag, lock_config=False).parse(path)
    except Exception:  # noqa: BLE001 - the caller re-raises the original error
        return None
    for override in _override_paths(argv, flag):
        message = unknown_field_message(config, override, flag)
        if message is not None:
            return message
    return None


def missing_config_file_message(argv: Sequence[str], flag: str = "config") -> str | None:
    """One line when --config names no file (ml_collections would only fail later, at the first access)."""
    value = _flag_value(argv, flag)
    if value is None or os.path.isfile(value.split(":", 1)[0]):
        return None
    return (
        f"--{flag}={value}: no such file {value.split(':', 1)[0]!r}; pass a config file, path[:arg], "
        "e.g. configs/memory_horizon.py:runlocal."
    )


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str | None:
    """One line for an error raised while absl parses argv, or None when it is a bug (keep its traceback)."""
    from absl import flags

    user_error = innermost_user_error(error)
    if user_error is not None:
        return str(user_error)
    if isinstance(error, (AttributeError, KeyError)):
        return config_override_message(argv)
    if isinstance(error, flags.Error):
        message = str(error)
        # A config file that fails with an error of its own (not a UserError) is a bug: ml_collections has put its
        # traceback in the message; show it whole.
        return None if "Traceback" in message else message + " (--helpfull lists the flags)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Runners


def run_absl(main: Callable[[list[str]], object], prog: str) -> None:
    """app.run(main) with user errors in one line (flag parsing included) and a --debug flag."""
    from absl import app, flags

    flags.DEFINE_bool("debug", False, f"Show the full traceback of a user error too (or set {DEBUG_ENV}=1).")
    debug = debug_requested(sys.argv)

    def parse(argv: list[str]) -> list[str]:
        message = missing_config_file_message(argv) if "config" in flags.FLAGS else None
        if message is not None and not debug:
            exit_user_error(prog, message)
        try:
            return flags.FLAGS(argv)
        except Exception as e:
            message = None if debug else flag_error_message(e, argv)
            if message is None:
                raise
            exit_user_error(prog, message)

    def guarded(argv: list[str]):
        try:
            return main(argv)
        except UserError as e:
            if debug:
                raise
            exit_user_error(prog, str(e))

    app.run(guarded, flags_parser=parse)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit status 2), with a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", help=f"show the full traceback of a user error too (or set {DEBUG_ENV}=1)"
        )

    def error(self, message: str) -> NoReturn:
        exit_user_error(self.prog, f"{message} (--help lists the arguments)")


def run_argparse(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None):
    """main(argv) with its UserErrors answered in one line (exit status 2) unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except UserError as e:
        if debug_requested(argv):
            raise
        exit_user_error(prog, str(e))
