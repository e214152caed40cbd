"""Errors meant for the user: one line, no traceback (unless --debug); the exit codes the task scripts return.

A UserError raised inside a DataLoader worker reaches the main process re-created by torch with the worker's
traceback as its message; the helpers here recover the original one-line message.
"""
from __future__ import annotations

import re
import sys

from utils.distributed import get_rank, get_world_size

# How torch.utils.data re-raises an exception of a worker in the main process (torch._utils.ExceptionWrapper).
_WORKER_HEADER = re.compile(r'Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback')


def worker_error_message(message: str, exc_type: type) -> str | None:
    """The original message of an exception that torch re-raised from a DataLoader worker, or None.

    torch re-creates the worker's exception as `exc_type(text)` where text is a header plus the formatted
    traceback, whose last line is '<module>.<Class>: <original message>'.
    """
    if not isinstance(message, str) or not _WORKER_HEADER.match(message):
        return None
    module, name = exc_type.__module__, exc_type.__qualname__
    marker = (name if module in ('builtins', '__main__') else f'{module}.{name}') + ': '
    k = message.rfind('\n' + marker)
    if k < 0:
        return None
    return message[k + 1 + len(marker):].rstrip('\n')


def unwrap_worker_error(exc: BaseException) -> BaseException | None:
    """For a UserError re-raised by torch from a DataLoader worker: the same error type with the original one-line
    message (the worker's traceback dropped); None for anything else."""
    if not isinstance(exc, UserError) or not exc.args or not isinstance(exc.args[0], str):
        return None
    original = worker_error_message(exc.args[0], type(exc))
    if original is None:
        return None
    try:
        return type(exc)(original)
    except Exception:  # noqa: BLE001 - a subclass with another constructor: keep the message, lose the type
        return UserError(original)


class UserError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flags). Printed as one line.

    Raised inside a DataLoader worker, the error reaches the main process re-created by torch with the worker's
    whole traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    the constructor recognises that form and keeps only the original one-line message.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            original = worker_error_message(args[0], type(self))
            if original is not None:
                args = (original,)
        super().__init__(*args)


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or does not match the schema."""


class WriteError(UserError):
    """A file could not be written (disk full, quota, read-only, permissions); its __cause__ is the OSError."""


EXIT_USER_ERROR = 2    # bad config, data, checkpoint or flags: the one-line message says what to fix
EXIT_PEER_LOST = 3     # another rank of a distributed run failed or was killed; this rank stopped on its own
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's status for a process ended by SIGTERM


def _rank_prefix() -> str:
    """'rank R of W: ' in a distributed run (so the line says which process failed), else ''."""
    return f'rank {get_rank()} of {get_world_size()}: ' if get_world_size() > 1 else ''


def print_error(message: str) -> None:
    """Print `message` as the one line `error: [rank R of W: ]<message>` on stderr."""
    # One line whatever the message quotes (a key or a path with a newline in it), so that logs stay greppable.
    message = message.replace('\r', '\\r').replace('\n', '\\n')
    # Straight to stderr: on ranks > 0 `print` is silenced by setup_for_distributed, and their errors must show.
    sys.stderr.write(f'error: {_rank_prefix()}{message}\n')
    sys.stderr.flush()
