"""Safe file handling: bounded reads, atomic writes, all-or-nothing log lines, one-line write errors, and the
output folder of a run (its checks, and the config.yaml that waits for the run's first output)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from typing import Any, Mapping, Sequence

import torch

from utils.errors import ConfigError, UserError, WriteError

# Bounds on the work of reading a config, which may come from anywhere (see utils.config).
MAX_CONFIG_BYTES = 4 << 20


def read_limited(path: str, what: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, a device or a directory is refused without
    blocking on it (opened non-blocking, checked with fstat). `what` names the file in the errors."""
    flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_NOCTTY', 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f'{what} not found: {path}') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the {what} ({e.strerror or e})') from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ('a directory' if stat.S_ISDIR(mode) else 'a FIFO (named pipe)' if stat.S_ISFIFO(mode) else
                    'a character device' if stat.S_ISCHR(mode) else 'a block device' if stat.S_ISBLK(mode) else
                    'a socket' if stat.S_ISSOCK(mode) else 'not a regular file')
            raise ConfigError(f'{path}: the {what} is {kind}, not a regular file')
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b''.join(chunks)
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the {what} ({e.strerror or e})') from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f'{path}: the {what} is larger than {limit >> 20} MiB; a config is a few KB')
    return data


TMP_SUFFIX = '.tmp-partial'


# A run's config.yaml waits here until the run writes its first output into its folder (see prepare_run): a run
# that fails on its inputs (data files, checkpoint, model) then leaves the folder as it found it.
_pending_config: dict = {}


def reset_pending_config() -> None:
    """Forget any config.yaml held back by an earlier run in this process."""
    _pending_config.clear()


def hold_config(folder: str, created: str | None, path: str | None = None, text: str | None = None) -> None:
    """Hold back the run's config.yaml (`text`, for `path`) until the run writes its first file into `folder`;
    `created` is the topmost folder the run created (removed again if the run fails before writing anything).
    Without `path` only the folder is remembered (a --resume run writes its config.yaml itself)."""
    _pending_config.clear()
    _pending_config.update(folder=folder, created=created)
    if path is not None:
        _pending_config.update(path=path, text=text)


def write_pending_config(target: str | None = None) -> None:
    """Write the pending config.yaml when `target` (a file about to be written) lies in the run's output folder,
    or unconditionally when `target` is None (the run ended well)."""
    if not _pending_config:
        return
    if target is not None and not os.path.abspath(target).startswith(_pending_config['folder'] + os.sep):
        return
    pending = dict(_pending_config)
    _pending_config.clear()  # first: the write below comes back through here
    if 'text' in pending:  # (a --resume run has none: engine.resume_training writes it)
        atomic_write_text(pending['path'], pending['text'])


def drop_pending_config() -> None:
    """Forget an unwritten config.yaml (the run failed before any output) and remove the output folder, and the
    parents created with it, if the run created them and they are still empty."""
    pending = dict(_pending_config)
    _pending_config.clear()
    created = pending.get('created')
    if not created:
        return
    folder = pending['folder']
    while True:
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            return
        if folder == created or len(folder) <= len(created):
            return
        folder = os.path.dirname(folder)


_DISK_REASONS = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded',
                 errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                 errno.EPERM: 'operation not permitted', errno.EFBIG: 'file too large', errno.EIO: 'input/output error'}


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError that caused `exc` (itself, or along its __cause__ / __context__ chain), or None.

    torch.save turns a failed write into a RuntimeError ('unexpected pos ...') raised while the OSError that
    caused it is being handled."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """'no space left on the device (ENOSPC)' and the like."""
    code = errno.errorcode.get(e.errno, str(e.errno))
    return f'{_DISK_REASONS.get(e.errno) or (e.strerror or str(e)).lower()} ({code})'



def _write_error(path: str, exc: BaseException) -> BaseException:
    """`exc` as a one-line WriteError naming `path` when an OSError caused it, else `exc` itself."""
    e = os_error_in(exc)
    if e is None or isinstance(exc, UserError):
        return exc
    err = WriteError(f'cannot write {path}: {describe_os_error(e)}')
    err.__cause__ = e
    return err


def _atomic_write(path: str, write) -> None:
    write_pending_config(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix=TMP_SUFFIX, dir=directory)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a partial one
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        err = _write_error(path, exc)
        if err is exc:
            raise
        raise err from err.__cause__


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode('utf-8')))



def remove_partial_files(directory: str) -> list[str]:
    """Delete temp files left by a write that was killed midway; returns their names."""
    if not os.path.isdir(directory):
        return []
    removed = [n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX)]
    for name in removed:
        os.remove(os.path.join(directory, name))
    return removed


def append_json_line(path: str, record: Mapping) -> None:
    """Append one JSON object as a line (log.txt), flushed to disk, all or nothing: a failed write (disk full) is
    cut back off the file, so that it keeps only whole lines, and raises a one-line WriteError naming it."""
    write_pending_config(path)
    data = (json.dumps(record) + '\n').encode('utf-8')
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise _write_error(path, e) from e
    finally:
        os.close(fd)

RUN_MARKERS = ('log.txt', 'checkpoint_last.pth', 'checkpoint_best.pth')
# What else the task scripts write into their folder (besides checkpoint_XX.pth): a folder that holds one of these
# but no run was not written by a run, and a new run must not replace them without --overwrite.
RUN_OUTPUTS = ('config.yaml', 'results.json', 'retrieval_test_metrics.json', 'grounding_results.json',
               'vqa_accuracy.json', 'result')


def _holds_text(path: str, text: str) -> bool:
    """Whether the regular file `path` holds exactly `text` (read without blocking on a FIFO or device)."""
    data = text.encode('utf-8')
    try:
        return read_limited(path, 'file', limit=len(data)) == data
    except ConfigError:
        return False


def _foreign_outputs(output_dir: str, names: Sequence[str], config_text: str | None,
                     config_file: str | None) -> list[str]:
    """The files in a folder without a run that this run would replace: RUN_OUTPUTS, but not a config.yaml that
    already holds exactly the config this run would write (left by a start that was killed), nor an empty
    result/ folder. Refuses at once a --config file that is the folder's own config.yaml."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if name not in names or (name == 'result' and os.path.isdir(path) and not os.listdir(path)):
            continue
        if name == 'config.yaml':
            if config_text is not None and _holds_text(path, config_text):
                continue
            if config_file and os.path.exists(config_file) and os.path.samefile(config_file, path):
                raise UserError(f'--config {config_file} is the config.yaml of --output_dir {output_dir}, which the '
                                f'run writes its resolved config to; keep the config outside the output folder, '
                                f'or pass --overwrite to let the run replace it')
        found.append(name + ('/' if os.path.isdir(path) else ''))
    return found


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool, evaluate: bool = False, *,
                       config_text: str | None = None, config_file: str | None = None) -> str | None:
    """Check `output_dir` before anything is written, then create it and check it is writable.

    Refused without --overwrite: a folder that holds another run (log.txt or checkpoints), unless `resume`
    continues it (an `evaluate` run never adds to a training run's folder); and in a folder without a run, any file
    the run would replace (RUN_OUTPUTS: a user's config.yaml, the --config file itself, result files), except a
    config.yaml holding exactly `config_text`. Removes partial files left by a killed write. Returns the topmost
    folder it created (output_dir or a parent of it), or None.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f'--output_dir {output_dir}: exists and is not a directory')
    names: list[str] = []
    if os.path.isdir(output_dir):
        try:
            names = os.listdir(output_dir)
        except OSError as e:
            raise UserError(f'--output_dir {output_dir}: cannot list it ({e.strerror})') from None
    run = sorted(n for n in names if n in RUN_MARKERS or (n.startswith('checkpoint_') and n.endswith('.pth')))
    if run and not overwrite:
        if evaluate:
            raise UserError(f'--output_dir {output_dir} already holds a run ({run[0]}, ...); --evaluate would add '
                            f'to its log.txt and replace its config.yaml and result files: evaluate into another '
                            f'folder, or pass --overwrite')
        if not resume:
            raise UserError(f'--output_dir {output_dir} already holds a run ({run[0]}, ...); '
                            f'pass --resume to continue it or --overwrite to start over there')
    if not run and not overwrite:
        foreign = _foreign_outputs(output_dir, names, config_text, config_file)
        if foreign:
            raise UserError(f'--output_dir {output_dir} holds {", ".join(foreign)}, not written by a run, that this '
                            f'run would replace; choose another folder, or pass --overwrite to replace '
                            f'{"it" if len(foreign) == 1 else "them"}')
    created, parent = None, os.path.abspath(output_dir)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {output_dir}: cannot create it ({e.strerror})') from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f'--output_dir {output_dir}: not writable')
    removed = remove_partial_files(output_dir)
    if removed:
        print(f'removed {len(removed)} partial file(s) left by an interrupted write: {", ".join(removed)}')
    return created

