"""`DataError`, the one-line error of bad input data, and the small helpers its messages use."""
from __future__ import annotations

import os
import stat

from utils import UserError


class DataError(UserError, ValueError):
    """Bad input data (annotation file, annotation item or image). The message is one line naming the culprit.

    Raised inside a DataLoader worker it keeps its one-line message (see utils.UserError).
    """


def brief(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, safe for values nested too deeply to repr (RecursionError)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f'<{type(value).__name__} nested too deeply to show>'
    return text[:limit]


def check_regular_file(path: str, what: str) -> None:
    """Raise DataError unless `path` is a regular file (after symlinks): a directory, a FIFO, a socket or a device
    would make the reader fail obscurely or block forever. A missing file raises FileNotFoundError (the callers
    word that one themselves)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kind = ('a directory' if stat.S_ISDIR(mode) else 'a named pipe (FIFO)' if stat.S_ISFIFO(mode)
            else 'a socket' if stat.S_ISSOCK(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else 'not a regular file')
    raise DataError(f'{what} {path}: is {kind}, not a regular file')
