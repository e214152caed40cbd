"""What a run keeps when it ends early: SIGTERM, full disks and failed writes, data loader workers that die."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Mapping

import utils
from utils import unwrap_worker_error
from engine.errors import TrainingError
from engine.state import TrainState


EXIT_TERMINATED = utils.EXIT_TERMINATED  # 143, the shell's status for a process ended by SIGTERM

# Which OSError made a write fail, and how to say it in words: one home, in utils.
os_error_in, describe_os_error = utils.os_error_in, utils.describe_os_error


class RunGuard:
    """What the current run has kept on disk, for the lines that end it early.

    `kept` is (path, epoch, steps done in it) of the newest resume point on disk, or None. Installed with
    `handle_sigterm()`, SIGTERM (what a cluster scheduler sends before it kills a job) ends the run with one line
    saying what was kept and how to continue, and exit status EXIT_TERMINATED, instead of silence. A checkpoint
    write in progress (`critical()`) is finished first, so the line never names an older file than the one on
    disk; a write cut short by the SIGKILL that may follow leaves the previous file, as after any kill.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.kept: tuple[str, int, int] | None = None
        self.state: TrainState | None = None  # the live position of the loop
        self._critical = 0
        self._pending = False
        self._stopping = False
        self._pid = os.getpid()

    # -- what is kept ----------------------------------------------------------------------------------------
    def keep(self, path: str, state: TrainState) -> None:
        self.kept = (path, state.epoch, state.step_in_epoch)

    def kept_text(self) -> str:
        if self.kept is None:
            return 'nothing of this run was saved yet'
        path, epoch, step = self.kept
        return f'{path} is kept (it resumes at epoch {epoch} step {step})'

    def resume_hint(self) -> str:
        if self.kept is None:
            return 'rerun the same command to start over'
        path = self.kept[0]
        if os.path.abspath(path) == os.path.abspath(os.path.join(self.output_dir, 'checkpoint_last.pth')):
            return 'continue with --resume'
        return f'continue with --resume --checkpoint {path}'

    # -- SIGTERM ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def critical(self):
        """A section SIGTERM does not cut (a checkpoint write and the record of it)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._pending:
                self._pending = False
                self._stop()

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked data loader worker: die as it would have without this handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._stopping:
            return
        if self._critical:
            self._pending = True
            return
        self._stop()

    def _stop(self) -> None:
        self._stopping = True
        # Data loader workers that got the same signal die too; torch's SIGCHLD handler would then raise its own
        # error in the middle of this exit.
        with contextlib.suppress(ValueError, OSError, AttributeError):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        where = '' if self.state is None else \
            f' at epoch {self.state.epoch} step {self.state.step_in_epoch}'
        hint = self.resume_hint()
        if self.kept is None:
            hint += ' (--save_every_steps N keeps a resume point every N steps)'
        prefix = f'rank {utils.get_rank()} of {utils.get_world_size()}: ' if utils.get_world_size() > 1 else ''
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        sys.stderr.write(f'error: {prefix}stopped by SIGTERM{where}; {self.kept_text()}: {hint}\n')
        sys.stderr.flush()
        raise SystemExit(EXIT_TERMINATED)

    def stop_if_terminated(self) -> None:
        """Exit now if SIGTERM arrived but its exit was lost.

        Python ignores an exception raised by a signal handler while a `__del__` runs (garbage collection can run
        one at any allocation), so the handler's SystemExit can vanish; the loop calls this at every step so the
        run still ends, with the line already printed."""
        if self._stopping and os.getpid() == self._pid:
            raise SystemExit(EXIT_TERMINATED)

    @contextlib.contextmanager
    def handle_sigterm(self):
        """Install the SIGTERM handler for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    # -- writes -----------------------------------------------------------------------------------------------
    def write_error(self, path: str, exc: BaseException) -> TrainingError | None:
        """The one-line error for a write of `path` that failed for lack of space, quota or permission, or None
        when `exc` was not caused by an OSError."""
        e = os_error_in(exc)
        if e is None:
            return None
        if self.kept is None:
            tail = 'nothing of this run was saved before; once the disk is fixed, ' + self.resume_hint()
        else:
            tail = (f'the files written before are unchanged and {self.kept_text()}; once the disk is fixed, '
                    f'{self.resume_hint()}')
        return TrainingError(f'cannot write {path}: {describe_os_error(e)}; {tail}')


def save_checkpoint_file(obj, path: str, guard: RunGuard) -> None:
    """utils.atomic_save, with a failed write (disk full, quota, read-only, permissions) as one line naming the
    file; the temp file is removed and the file it would have replaced stays as it was."""
    try:
        utils.atomic_save(obj, path)
    except Exception as e:  # noqa: BLE001 - only OSError-caused failures are converted, the rest re-raised
        err = guard.write_error(path, e)
        if err is None:
            raise
        for name in os.listdir(os.path.dirname(os.path.abspath(path))):  # a temp file left by a failed removal
            if name.startswith(os.path.basename(path) + '.') and name.endswith(utils.TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(os.path.dirname(os.path.abspath(path)), name))
        raise err from None


def append_log_line(path: str, record: Mapping, guard: RunGuard) -> None:
    """utils.append_json_line (all or nothing), with a failed write ending the run in one line that also says
    what is kept and how to continue."""
    try:
        utils.append_json_line(path, record)
    except utils.WriteError as e:
        raise guard.write_error(path, e.__cause__) from None


def next_batch(iterator, loader):
    """next(iterator) of a DataLoader, with its workers' failures as one line: a user error raised in a worker
    (bad image, bad item) comes back with its own message instead of the worker's traceback, and a worker that
    died (killed for memory, most likely) is named as such."""
    try:
        return next(iterator)
    except utils.UserError as e:
        clean = unwrap_worker_error(e)
        if clean is None:
            raise
        raise clean from None
    except RuntimeError as e:
        err = worker_death_error(e, getattr(loader, 'num_workers', None))
        if err is None:
            raise
        raise err from None


def worker_death_error(exc: BaseException, num_workers=None) -> TrainingError | None:
    """The one line for torch's 'DataLoader worker (pid N) is killed by signal ...' / '... exited unexpectedly'
    (raised by its SIGCHLD handler wherever the main process happens to be), or None for other errors."""
    if not isinstance(exc, RuntimeError):
        return None
    first = (str(exc).strip().splitlines() or [''])[0]
    if not first.startswith('DataLoader worker'):
        return None
    now = f', now {num_workers}' if num_workers is not None else ''
    return TrainingError(f'a data loader worker died ({first.rstrip(". ")}); if the system killed it for lack of '
                         f'memory, use fewer workers (--num_workers{now}) or a smaller batch')
