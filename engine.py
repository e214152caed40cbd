"""The training engine shared by every task script.

A task supplies `step_fn(model, batch, alpha) -> {loss name: scalar tensor}`; the engine sums the losses,
backpropagates (with gradient accumulation and autocast), steps the optimizer and the original's warm-up
schedule, logs every loss, stops on a non-finite loss, and writes atomic checkpoints from which a run resumes
exactly (model with momentum encoders and queues, optimizer, scheduler, epoch, step, RNG states, data position).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

import utils
from dataset.resumable import ResumableSampler
from optim import optimizer_needs_create_graph

StepFn = Callable[[torch.nn.Module, object, float], Mapping[str, torch.Tensor]]


class TrainingError(utils.UserError):
    """Training cannot go on (e.g. a non-finite loss)."""


# ----------------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------------
def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` (fp32: none). fp16 is refused on CPU, where it has no fast kernels."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision == 'fp16' and device.type != 'cuda':
        raise utils.UserError('--precision fp16 needs a CUDA device (it is unusably slow on CPU); use bf16')
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# RNG state in a form that torch.load(weights_only=True) accepts
# ----------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'python': {'version': version, 'state': list(py_state), 'gauss': gauss}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def rng_state_problem(state) -> str | None:
    """What is wrong with an RNG state as `get_rng_state` writes it (types, keys, sizes), or None when usable."""
    if not isinstance(state, Mapping):
        return f'must be a dict, got {type(state).__name__}'
    for key in ('torch', 'numpy', 'python'):
        if key not in state:
            return f'missing key {key!r}'
    t = state['torch']
    expected = torch.get_rng_state()
    if not torch.is_tensor(t) or t.dtype != torch.uint8 or tuple(t.shape) != tuple(expected.shape):
        what = f'{t.dtype} tensor of shape {tuple(t.shape)}' if torch.is_tensor(t) else type(t).__name__
        return f"'torch' must be a uint8 tensor of shape {tuple(expected.shape)}, got {what}"
    n = state['numpy']
    if not isinstance(n, Mapping) or any(k not in n for k in ('keys', 'pos', 'has_gauss', 'cached_gaussian')):
        return "'numpy' must be a dict with keys, pos, has_gauss and cached_gaussian"
    keys = n['keys']
    if not torch.is_tensor(keys) or keys.dtype != torch.int64 or tuple(keys.shape) != (624,):
        return "'numpy.keys' must be an int64 tensor of 624 values"
    if bool((keys < 0).any()) or bool((keys >= 2 ** 32).any()):
        return "'numpy.keys' holds values outside 0 .. 2**32 - 1"
    if not _is_int(n['pos']) or not 0 <= n['pos'] <= 624:
        return f"'numpy.pos' must be an int in 0 .. 624, got {n['pos']!r:.40}"
    if not _is_int(n['has_gauss']) or not _is_number(n['cached_gaussian']):
        return "'numpy.has_gauss' must be an int and 'numpy.cached_gaussian' a number"
    p = state['python']
    if not isinstance(p, Mapping) or any(k not in p for k in ('version', 'state', 'gauss')):
        return "'python' must be a dict with version, state and gauss"
    ps = p['state']
    if not _is_int(p['version']) or not isinstance(ps, (list, tuple)) or len(ps) != 625 \
            or not all(_is_int(v) and 0 <= v < 2 ** 32 for v in ps) or ps[-1] > 624:
        return "'python' must hold an int version and a state of 625 ints (random.getstate())"
    if p['gauss'] is not None and not _is_number(p['gauss']):
        return f"'python.gauss' must be a number or null, got {p['gauss']!r:.40}"
    cuda = state.get('cuda')
    if cuda is not None and not (isinstance(cuda, (list, tuple))
                                 and all(torch.is_tensor(c) and c.dtype == torch.uint8 for c in cuda)):
        return "'cuda' must be a list of uint8 tensors"
    return None


def set_rng_state(state: Mapping) -> None:
    """Restore the states `get_rng_state` saved; TrainingError (before changing anything) for a malformed one.

    CUDA states are restored for the devices present (a checkpoint of an 8-GPU machine also resumes on fewer)."""
    problem = rng_state_problem(state)
    if problem is not None:
        raise TrainingError(f'RNG state: {problem}')
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if state.get('cuda') is not None and torch.cuda.is_available():
        cuda = list(state['cuda'])[:torch.cuda.device_count()]
        for i, c in enumerate(cuda):
            torch.cuda.set_rng_state(c, i)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so that --resume continues exactly."""
    epoch: int = 0              # epoch in progress (or the next one when step_in_epoch == 0)
    step_in_epoch: int = 0      # optimizer micro-batches already done in `epoch`
    global_step: int = 0
    best: float | None = None   # best value of the task's best-metric so far
    best_epoch: int | None = None
    extra: dict = field(default_factory=dict)


def build_checkpoint(model_without_ddp, optimizer, scheduler, config: Mapping, state: TrainState) -> dict:
    """The checkpoint dict: the original's keys (model, optimizer, lr_scheduler, config, epoch) plus resume state."""
    return {'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'lr_scheduler': scheduler.state_dict(),
            'config': dict(config),
            'epoch': state.epoch - 1,  # the last completed epoch, as the original stores it
            'train_state': {'epoch': state.epoch, 'step_in_epoch': state.step_in_epoch,
                            'global_step': state.global_step, 'best': state.best, 'best_epoch': state.best_epoch},
            'rng': get_rng_state()}


def restore_training(checkpoint: Mapping, model_without_ddp, optimizer, scheduler,
                     path: str = 'the checkpoint') -> TrainState:
    """Load a checkpoint written by `build_checkpoint` into the objects and return where to continue.

    Everything is checked first (`check_training_state`): a checkpoint whose tensors, optimizer groups, scheduler,
    train_state or RNG state do not fit raises TrainingError naming `path` and the entry, with nothing loaded.
    """
    check_training_state(checkpoint, model_without_ddp, optimizer, scheduler, path)
    model_without_ddp.load_state_dict(checkpoint['model'], strict=True)
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise TrainingError(f"{path}: cannot resume, entry 'optimizer' does not fit the optimizer "
                            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    try:
        scheduler.load_state_dict(checkpoint['lr_scheduler'])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainingError(f"{path}: cannot resume, entry 'lr_scheduler' does not fit the scheduler "
                            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    ts = checkpoint.get('train_state')
    if ts is None:  # an original ALBEF checkpoint: resume at the next epoch, as the original does
        return TrainState(epoch=int(checkpoint['epoch']) + 1)
    if 'rng' in checkpoint:
        set_rng_state(checkpoint['rng'])
    return TrainState(epoch=ts['epoch'], step_in_epoch=ts['step_in_epoch'], global_step=ts['global_step'],
                      best=ts['best'], best_epoch=ts['best_epoch'])


def _shape(t) -> tuple:
    return tuple(t.shape)


def _state_tensor_fits(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether an optimizer state tensor can belong to parameter `p`: a scalar, p's shape, or (Adafactor) one of
    its factored second-moment shapes."""
    if t.ndim == 0 or t.numel() == 1 or t.shape == p.shape:
        return True
    return p.ndim >= 2 and _shape(t) in (_shape(p)[:-1], _shape(p)[:-2] + _shape(p)[-1:])


def _optimizer_problem(saved, optimizer, model) -> str | None:
    """What in a saved optimizer state does not fit `optimizer` (groups, sizes, state shapes), or None."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get('state'), Mapping) \
            or not isinstance(saved.get('param_groups'), (list, tuple)):
        return 'it is not an optimizer state (a dict with state and param_groups)'
    groups = optimizer.param_groups
    if len(saved['param_groups']) != len(groups):
        return (f"the checkpoint has {len(saved['param_groups'])} parameter group(s), the optimizer "
                f"{len(groups)} (other optimizer settings, or other frozen parameters?)")
    names = {id(p): n for n, p in model.named_parameters()}
    for g, (sg, group) in enumerate(zip(saved['param_groups'], groups)):
        if not isinstance(sg, Mapping) or not isinstance(sg.get('params'), (list, tuple)):
            return f'parameter group {g} has no list of params'
        if len(sg['params']) != len(group['params']):
            return (f"parameter group {g} holds {len(sg['params'])} parameters in the checkpoint, "
                    f"{len(group['params'])} in the optimizer (other model options, or other frozen parameters?)")
        for pid, p in zip(sg['params'], group['params']):
            st = saved['state'].get(pid)
            if st is None:
                continue
            if not isinstance(st, Mapping):
                return f'the state of parameter {names.get(id(p), pid)} is a {type(st).__name__}, not a dict'
            for key, t in st.items():
                if torch.is_tensor(t) and not _state_tensor_fits(t, p):
                    return (f"state {key!r} of parameter {names.get(id(p), pid)} has shape {_shape(t)}, the "
                            f"parameter {_shape(p)}")
    return None


def _train_state_problem(checkpoint: Mapping) -> str | None:
    ts = checkpoint.get('train_state')
    if ts is None:
        return None if _is_int(checkpoint.get('epoch')) else \
            f"entry 'epoch' must be an int, got {checkpoint.get('epoch')!r:.40}"
    if not isinstance(ts, Mapping):
        return f"entry 'train_state' must be a dict, got {type(ts).__name__}"
    for key in ('epoch', 'step_in_epoch', 'global_step'):
        if key not in ts:
            return f"entry 'train_state' has no key {key!r}"
        if not _is_int(ts[key]) or ts[key] < 0:
            return f"entry 'train_state' key {key!r} must be an int >= 0, got {ts[key]!r:.40}"
    for key, ok in (('best', lambda v: v is None or (_is_number(v) and math.isfinite(v))),
                    ('best_epoch', lambda v: v is None or (_is_int(v) and v >= 0))):
        if key not in ts:
            return f"entry 'train_state' has no key {key!r}"
        if not ok(ts[key]):
            return f"entry 'train_state' key {key!r} must be {'a number' if key == 'best' else 'an int'} or null, " \
                   f"got {ts[key]!r:.40}"
    return None


def check_training_state(checkpoint: Mapping, model_without_ddp, optimizer, scheduler,
                         path: str = 'the checkpoint') -> None:
    """Raise TrainingError naming `path` and what does not match, before anything of `checkpoint` is loaded:
    the model's tensors (keys, shapes, kinds of dtype, NaN/inf), the optimizer's groups and state shapes, the
    scheduler state, train_state and the RNG states."""
    from models.checkpoint import dtype_mismatches, first_non_finite

    def fail(what: str):
        raise TrainingError(f'{path}: cannot resume, {what}')
    saved, expected = checkpoint.get('model'), model_without_ddp.state_dict()
    if not isinstance(saved, Mapping):
        fail(f"entry 'model' is a {type(saved).__name__}, not a state dict")
    not_tensors = [k for k, v in saved.items() if not torch.is_tensor(v)]
    if not_tensors:
        fail(f"entry 'model' holds non-tensor values ({', '.join(map(str, not_tensors[:3]))})")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        fail(f'the checkpoint holds another model (missing {missing[:3]}, unexpected {unexpected[:3]})')
    shapes = [k for k in expected if _shape(saved[k]) != _shape(expected[k])]
    if shapes:
        k = shapes[0]
        fail(f"the checkpoint's model does not match this one: {k} is {_shape(saved[k])} in the checkpoint, "
             f"{_shape(expected[k])} in the model{f' (and {len(shapes) - 1} more)' if len(shapes) > 1 else ''}")
    dtypes = dtype_mismatches(saved, expected)
    if dtypes:
        fail(f"the checkpoint's model does not match this one: dtype of {dtypes[0]}"
             f"{f' (and {len(dtypes) - 1} more)' if len(dtypes) > 1 else ''}")
    bad = first_non_finite(saved)
    if bad is not None:
        fail(f'the weights hold non-finite values (NaN or inf) in {bad}')
    problem = _optimizer_problem(checkpoint.get('optimizer'), optimizer, model_without_ddp)
    if problem is not None:
        fail(f"entry 'optimizer' does not match: {problem}")
    sched = checkpoint.get('lr_scheduler')
    if not isinstance(sched, Mapping) or not all(isinstance(k, str) for k in sched):
        fail(f"entry 'lr_scheduler' must be a dict of settings, got {type(sched).__name__}")
    current = scheduler.state_dict() if hasattr(scheduler, 'state_dict') else {}
    for k, v in current.items():
        if k in sched and _is_number(v) and not (_is_number(sched[k]) or sched[k] is None):
            fail(f"entry 'lr_scheduler' key {k!r} must be a number, got {sched[k]!r:.40}")
    problem = _train_state_problem(checkpoint)
    if problem is not None:
        fail(problem)
    if checkpoint.get('train_state') is not None and 'rng' in checkpoint:
        problem = rng_state_problem(checkpoint['rng'])
        if problem is not None:
            fail(f"entry 'rng' is malformed: {problem}")


def first_non_finite_tensor(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer of `module` holding NaN or inf, or None."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _divergence(model: torch.nn.Module, error: RuntimeError) -> str | None:
    """Why a forward that raised `error` failed, when the cause is non-finite numbers; None for other errors."""
    bad = first_non_finite_tensor(model)
    if bad is not None:
        return f'non-finite weights ({bad})'
    first = (str(error).strip().splitlines() or [''])[0]
    if re.search(r'\b(nan|inf)\b', first, re.IGNORECASE):  # e.g. torch.multinomial on NaN probabilities
        return f'non-finite values inside the forward ({first[:120]})'
    return None


def check_resume_checkpoint(checkpoint, model_without_ddp, path: str) -> None:
    """Refuse to resume from something that is not a training checkpoint of this model, with one line that says
    what it is instead (model weights only, another task's checkpoint, a model built with other options)."""
    from models.checkpoint import CheckpointError, detect_kind
    lacking = [k for k in ('model', 'optimizer', 'lr_scheduler', 'epoch')
               if not isinstance(checkpoint, Mapping) or k not in checkpoint]
    if lacking:
        raise TrainingError(f'{path}: cannot resume, not a training checkpoint (no {lacking[0]!r} entry); to start '
                            f'from its weights, pass it with --checkpoint and without --resume')
    saved, expected = checkpoint['model'], model_without_ddp.state_dict()
    if not isinstance(saved, Mapping):
        raise TrainingError(f"{path}: cannot resume, its 'model' entry is a {type(saved).__name__}, not a state "
                            f"dict")
    if set(saved) == set(expected):
        return
    try:
        saved_kind, model_kind = detect_kind(saved), detect_kind(expected)
    except (CheckpointError, AttributeError, TypeError):
        saved_kind = model_kind = None
    if saved_kind != model_kind:
        raise TrainingError(f"{path}: cannot resume a '{model_kind}' run from a '{saved_kind}' checkpoint; to start "
                            f"from its weights, pass it with --checkpoint and without --resume")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    raise TrainingError(f'{path}: cannot resume, the checkpoint holds another model (missing {missing[:3]}, '
                        f'unexpected {unexpected[:3]}); was it made with other model options?')


def check_resume_config(saved: Mapping, current: Mapping, path: str) -> None:
    """Refuse to resume a run whose model or data shape differs from the checkpoint's config."""
    if not isinstance(saved, Mapping):
        raise TrainingError(f"{path}: cannot resume, its 'config' entry is a {type(saved).__name__}, not a dict")
    keys = ('bert_config', 'image_res', 'patch_size', 'vision_width', 'vision_depth', 'embed_dim', 'queue_size',
            'batch_size', 'batch_size_train', 'train_file', 'optimizer')
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        k = diffs[0]
        raise TrainingError(f'{path}: cannot resume, the checkpoint was made with another config '
                            f'({k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now)')


# ----------------------------------------------------------------------------------------------------------------
# What a run keeps: SIGTERM, full disks, data loader workers
# ----------------------------------------------------------------------------------------------------------------
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
        from dataset.utils import unwrap_worker_error
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


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    """Knobs of the loop, resolved from the task config and the command line."""
    alpha: float = 0.0
    warm_up: bool = True           # ramp alpha over epoch 0, as the original
    warmup_steps: int = 0          # schedular.warmup_epochs: lr warm-up in 100-iteration steps of epoch 0
    precision: str = 'fp32'
    grad_accum_steps: int = 1
    print_freq: int = 50
    save_every_steps: int = 0      # also checkpoint mid-epoch every N optimizer steps (0: only at epoch ends)
    max_steps_per_epoch: int = 0   # 0: whole epoch (a small positive value is for smoke tests)
    epoch_checkpoint_every: int = 1  # keep checkpoint_XX.pth every N epochs and of the last one (0: none)


def _alpha_for(cfg: EngineConfig, epoch: int, i: int, n: int) -> float:
    if epoch > 0 or not cfg.warm_up:
        return cfg.alpha
    return cfg.alpha * min(1.0, i / n)


def train_one_epoch(model, loader, optimizer, scheduler, step_fn: StepFn, device: torch.device,
                    cfg: EngineConfig, state: TrainState, save_fn: Callable[[TrainState], None] | None = None,
                    header: str = 'Train') -> dict[str, float]:
    """Train for one epoch, starting at `state.step_in_epoch`; returns the epoch's average of each loss and lr."""
    model.train()
    logger = utils.MetricLogger(window_size=50)
    epoch, start = state.epoch, state.step_in_epoch
    n_total = start + len(loader)
    if cfg.max_steps_per_epoch:
        n_total = min(n_total, cfg.max_steps_per_epoch)
    create_graph = optimizer_needs_create_graph(optimizer)
    optimizer.zero_grad(set_to_none=True)
    iterator = iter(loader)
    for i in logger.log_every(range(start, n_total), cfg.print_freq, f'{header} epoch [{epoch}]'):
        batch = next_batch(iterator, loader)
        alpha = _alpha_for(cfg, epoch, i, n_total)
        with autocast(device, cfg.precision):
            try:
                losses = step_fn(model, batch, alpha)
            except RuntimeError as e:
                # Diverged training often fails inside the forward (e.g. sampling ITM negatives from NaN
                # probabilities) before a loss exists to check: say so instead of showing the op's traceback.
                reason = _divergence(model, e)
                if reason is None:
                    raise
                raise TrainingError(f'{reason} at epoch {epoch} step {i}: training diverged (learning rate too '
                                    f'high?); stopping (the last good checkpoint is kept)') from e
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()).all():
            values = ', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())
            raise TrainingError(f'non-finite loss at epoch {epoch} step {i}: {values}; stopping '
                                f'(the last good checkpoint is kept)')
        (loss / cfg.grad_accum_steps).backward(create_graph=create_graph)
        if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == n_total:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # The original's warm-up: in epoch 0, step the scheduler every 100 iterations up to warmup_steps.
        if epoch == 0 and i % 100 == 0 and i <= 100 * cfg.warmup_steps:
            scheduler.step(i // 100)
        logger.update(lr=optimizer.param_groups[0]['lr'], **{k: v.detach().float() for k, v in losses.items()})
        state.step_in_epoch = i + 1
        state.global_step += 1
        if save_fn is not None and cfg.save_every_steps and state.step_in_epoch % cfg.save_every_steps == 0 \
                and state.step_in_epoch < n_total:
            save_fn(state)
    logger.synchronize_between_processes()
    print(f'Averaged stats: {logger.global_avg()}', flush=True)
    return logger.averages()


def _step_scheduler(scheduler, t: int, config: Mapping, last_record: Mapping) -> None:
    """Epoch-level scheduler step; a plateau schedule also gets last epoch's `schedular.eval_metric` value."""
    from scheduler import PlateauLRScheduler
    if not isinstance(scheduler, PlateauLRScheduler):
        scheduler.step(t)
        return
    key = config['schedular'].get('eval_metric', 'loss')
    for name in (key, f'train_{key}'):
        if name in last_record:
            scheduler.step(t, float(last_record[name]))
            return
    raise TrainingError(f"schedular.eval_metric '{key}' is not among last epoch's metrics "
                        f"({', '.join(sorted(last_record))})")


def _keeps_epoch_checkpoint(every: int, epoch: int, num_epochs: int) -> bool:
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == num_epochs)


def fit(*, model, model_without_ddp, train_loader, optimizer, scheduler, step_fn: StepFn, config: Mapping,
        engine_cfg: EngineConfig, device: torch.device, output_dir: str, num_epochs: int,
        state: TrainState | None = None, evaluate_fn: Callable[[int], dict] | None = None,
        best_metric: str | None = None, save_epoch_checkpoints: bool = True,
        guard: RunGuard | None = None) -> TrainState:
    """Train for `num_epochs`, evaluating after each epoch, logging one JSON line per epoch and checkpointing.

    Checkpoints: `checkpoint_last.pth` (resume point: every epoch end and every `save_every_steps`),
    `checkpoint_XX.pth` when `save_epoch_checkpoints` (every `epoch_checkpoint_every` epochs, and the last epoch),
    and `checkpoint_best.pth` whenever `evaluate_fn(epoch)[best_metric]` improves.
    `guard` (see RunGuard; `train` installs one for SIGTERM) records each resume point written; a write that
    fails for lack of space or permission ends the run with one line naming the file, earlier files intact.
    """
    state = state or TrainState()
    guard = guard or RunGuard(output_dir)
    guard.state = state
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, 'log.txt')
    sampler = getattr(train_loader, 'sampler', None)

    def save(s: TrainState, name: str = 'checkpoint_last.pth') -> None:
        bad = first_non_finite_tensor(model_without_ddp)
        if bad is not None:  # never replace the last good checkpoint by a diverged one
            raise TrainingError(f'non-finite weights ({bad}) when saving {name} (epoch {s.epoch}, {s.step_in_epoch} '
                                f'steps done): training diverged; stopping (the last good checkpoint is kept)')
        path = os.path.join(output_dir, name)
        with guard.critical():
            if utils.is_main_process():
                save_checkpoint_file(build_checkpoint(model_without_ddp, optimizer, scheduler, config, s), path,
                                     guard)
            utils.barrier()
            if name == 'checkpoint_last.pth':
                guard.keep(path, s)

    start_time = time.time()
    last_record: dict = {}
    while state.epoch < num_epochs:
        epoch = state.epoch
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(epoch, start_batch=state.step_in_epoch)
        elif hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        if epoch > 0 and state.step_in_epoch == 0:
            _step_scheduler(scheduler, epoch + engine_cfg.warmup_steps, config, last_record)
        try:
            train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, step_fn, device, engine_cfg,
                                          state, save_fn=save)
            eval_stats = evaluate_fn(epoch) if evaluate_fn is not None else None
        except RuntimeError as e:  # a worker's death surfaces wherever the main process happens to be
            err = worker_death_error(e, getattr(train_loader, 'num_workers', None))
            if err is None:
                raise
            raise err from None
        record = {f'train_{k}': v for k, v in train_stats.items()}
        improved = False
        if evaluate_fn is not None:
            record.update(eval_stats)
            if best_metric is not None:
                value = float(eval_stats[best_metric])
                if state.best is None or value > state.best:
                    state.best, state.best_epoch, improved = value, epoch, True
        record['epoch'] = epoch
        record['time_s'] = round(time.time() - start_time, 1)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if utils.is_main_process():
            with guard.critical():
                append_log_line(log_path, record, guard)
        last_record = record
        if save_epoch_checkpoints and _keeps_epoch_checkpoint(engine_cfg.epoch_checkpoint_every, epoch, num_epochs):
            save(state, f'checkpoint_{epoch:02d}.pth')
        if improved:
            save(state, 'checkpoint_best.pth')
        save(state)
    if best_metric is not None and utils.is_main_process() and state.best_epoch is not None:
        with guard.critical():
            append_log_line(log_path, {'best_epoch': state.best_epoch, f'best_{best_metric}': state.best}, guard)
    print(f'Training time {time.time() - start_time:.1f} s', flush=True)
    return state


def epoch_count(schedular_cfg: Mapping) -> int:
    """Number of epochs of a schedule (the `epochs` key of the schedular block)."""
    return int(math.ceil(schedular_cfg['epochs']))


# ----------------------------------------------------------------------------------------------------------------
# Building what a task script trains
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer(config: Mapping):
    """The tokenizer named by config['text_encoder'] (hub name or local folder), original single-text format."""
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(config.get('text_encoder', 'bert-base-uncased'))


DDP_BUCKET_CAP_MB = 25  # torch's default; config 'ddp_bucket_cap_mb' (larger buckets: fewer all-reduce calls)


def build_model(task: str, config: Mapping, tokenizer, args, device: torch.device, resume: bool = False):
    """Create the task's model, initialise it (checkpoint, or pretrained BERT/ViT weights), freeze the ViT when the
    config says `freeze_vision`, move it, wrap in DDP.

    With `resume` the weights come later from the run's own checkpoint (see `resume_training`).
    Returns (model, model_without_ddp).
    """
    import models
    from models.checkpoint import load_checkpoint
    from models.pretrained import apply_pretrained
    model = models.create_model(task, config, tokenizer)
    if args.checkpoint and not resume:
        report = load_checkpoint(model, args.checkpoint, task, allow_pickle=args.unsafe_load)
        print(f'loaded checkpoint {args.checkpoint} ({report.get("source_kind", "?")} -> {task})')
    elif not resume:
        apply_pretrained(model, config)
        model.copy_params()
    if config.get('freeze_vision', False):
        # A locked image tower (LiT): the optimizer skips parameters without grad, so the ViT keeps its weights and
        # its forward builds no autograd graph; its momentum copy stays equal to it (up to rounding).
        model.visual_encoder.requires_grad_(False)
    model.to(device)
    model_without_ddp = model
    if getattr(args, 'distributed', False):
        device_ids = [args.gpu] if device.type == 'cuda' else None
        # Some variants own parameters that get no gradient (the TA model's text_proj and temp). Gradients as
        # views into the all-reduce buckets: otherwise each rank holds every gradient twice (0.84 GB at full size).
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=(task == 'pretrain_nlvr'),
            gradient_as_bucket_view=True, bucket_cap_mb=config.get('ddp_bucket_cap_mb', DDP_BUCKET_CAP_MB))
    return model, model_without_ddp


def build_optimizer_and_scheduler(config: Mapping, model_without_ddp):
    """Optimizer from the YAML `optimizer:` block, scheduler from `schedular:`; returns (opt, sched, epochs)."""
    from optim import create_optimizer
    from scheduler import create_scheduler
    optimizer = create_optimizer(utils.AttrDict(config['optimizer']), model_without_ddp)
    lr_scheduler, _ = create_scheduler(utils.AttrDict(config['schedular']), optimizer)
    return optimizer, lr_scheduler, epoch_count(config['schedular'])


def resume_training(args, config: Mapping, model_without_ddp, optimizer, lr_scheduler,
                    guard: RunGuard | None = None) -> TrainState:
    """With --resume, restore everything from --checkpoint or output_dir/checkpoint_last.pth; else a fresh state.

    The config must agree with the checkpoint's on the model and data shape (check_resume_config); once it does,
    output_dir/config.yaml is rewritten with the config of the resumed run.
    """
    if not args.resume:
        return TrainState()
    from models.checkpoint import read_checkpoint
    path = args.checkpoint or os.path.join(args.output_dir, 'checkpoint_last.pth')
    if not os.path.isfile(path):
        raise TrainingError(f'--resume: no checkpoint to resume from at {path}')
    checkpoint = read_checkpoint(path, allow_pickle=args.unsafe_load)
    check_resume_checkpoint(checkpoint, model_without_ddp, path)
    if 'config' in checkpoint:
        check_resume_config(checkpoint['config'], config, path)
    state = restore_training(checkpoint, model_without_ddp, optimizer, lr_scheduler, path=path)
    guard = guard or RunGuard(args.output_dir)
    guard.keep(path, state)
    if utils.is_main_process():  # only now: a refused resume must leave the run's config.yaml as it was
        config_path = os.path.join(args.output_dir, 'config.yaml')
        try:
            utils.save_config(config, config_path)
        except Exception as e:  # noqa: BLE001 - a full or read-only disk becomes one line, anything else re-raised
            err = guard.write_error(config_path, e)
            if err is None:
                raise
            raise err from None
    print(f'resumed from {path}: epoch {state.epoch}, step {state.step_in_epoch} of that epoch')
    return state


def engine_config(config: Mapping, **overrides) -> EngineConfig:
    """Loop settings from a task config (alpha, warm_up, warm-up epochs, precision, accumulation, print_freq)."""
    cfg = EngineConfig(alpha=float(config.get('alpha', 0.0)), warm_up=bool(config.get('warm_up', True)),
                       warmup_steps=int(config['schedular'].get('warmup_epochs', 0)),
                       precision=config.get('precision', 'fp32'),
                       grad_accum_steps=int(config.get('grad_accum_steps', 1)),
                       print_freq=int(config.get('print_freq', 50)),
                       epoch_checkpoint_every=int(config.get('epoch_checkpoint_every', 1)))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def train(args, config: Mapping, model, model_without_ddp, train_loader, step_fn: StepFn, device: torch.device, *,
          evaluate_fn: Callable[[int], dict] | None = None, best_metric: str | None = None,
          save_epoch_checkpoints: bool = True, **engine_overrides) -> TrainState:
    """The training part of every task script: optimizer and scheduler from the config, --resume, then `fit`.

    `args` supplies output_dir, resume/checkpoint and the loop flags --save_every_steps and --max_steps_per_epoch;
    `engine_overrides` set further EngineConfig fields (e.g. alpha=0.0 for TA pretraining). The train loader is
    built by the caller, since its collate function and its place among the random draws differ by task.
    Returns the final TrainState (best_epoch set when `best_metric` is given).
    """
    optimizer, lr_scheduler, num_epochs = build_optimizer_and_scheduler(config, model_without_ddp)
    guard = RunGuard(args.output_dir)
    with guard.handle_sigterm():
        state = resume_training(args, config, model_without_ddp, optimizer, lr_scheduler, guard=guard)
        cfg = engine_config(config, save_every_steps=args.save_every_steps,
                            max_steps_per_epoch=args.max_steps_per_epoch, **engine_overrides)
        return fit(model=model, model_without_ddp=model_without_ddp, train_loader=train_loader, optimizer=optimizer,
                   scheduler=lr_scheduler, step_fn=step_fn, config=config, engine_cfg=cfg, device=device,
                   output_dir=args.output_dir, num_epochs=num_epochs, state=state, evaluate_fn=evaluate_fn,
                   best_metric=best_metric, save_epoch_checkpoints=save_epoch_checkpoints, guard=guard)
