"""Where training stands and the checkpoint that carries it: build one, check one against the objects of this
run (model, optimizer, scheduler, config, RNG states) and restore it, refusing with one line before anything is
loaded when it does not fit."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from engine.errors import TrainingError
from engine.rng import get_rng_state, is_int, is_number, rank_rng_state, rng_state_problem, set_rng_state
from models.checkpoint import CheckpointError, detect_kind, dtype_mismatches, first_non_finite


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so that --resume continues exactly."""
    epoch: int = 0              # epoch in progress (or the next one when step_in_epoch == 0)
    step_in_epoch: int = 0      # optimizer micro-batches already done in `epoch`
    global_step: int = 0
    best: float | None = None   # best value of the task's best-metric so far
    best_epoch: int | None = None
    skipped_steps: int = 0      # fp16: optimizer steps of `epoch` skipped for inf/NaN gradients so far
    last_record: dict = field(default_factory=dict)  # plateau schedules: the metrics of the last epoch they read
    extra: dict = field(default_factory=dict)


def build_checkpoint(model_without_ddp, optimizer, scheduler, config: Mapping, state: TrainState,
                     scaler: torch.amp.GradScaler | None = None, rng_states: list | None = None) -> dict:
    """The checkpoint dict: the original's keys (model, optimizer, lr_scheduler, config, epoch) plus resume state
    (and, for fp16, the loss scaler's state under 'scaler'; in a multi-rank run every rank's RNG state,
    `rng_states` from `gather_rng_states`, under 'rng_per_rank').

    `optimizer.state_dict()` must be complete here: a ZeroRedundancyOptimizer has to be consolidated first."""
    train_state = {'epoch': state.epoch, 'step_in_epoch': state.step_in_epoch, 'global_step': state.global_step,
                   'best': state.best, 'best_epoch': state.best_epoch}
    # Only where they matter, so that fp32/bf16 checkpoints of other schedules keep exactly their former content.
    if state.skipped_steps:
        train_state['skipped_steps'] = state.skipped_steps
    if state.last_record:
        train_state['last_record'] = dict(state.last_record)
    checkpoint = {'model': model_without_ddp.state_dict(),
                  'optimizer': optimizer.state_dict(),
                  'lr_scheduler': scheduler.state_dict(),
                  'config': dict(config),
                  'epoch': state.epoch - 1,  # the last completed epoch, as the original stores it
                  'train_state': train_state,
                  'rng': get_rng_state()}
    if scaler is not None:
        checkpoint['scaler'] = scaler.state_dict()
    if rng_states:
        checkpoint['rng_per_rank'] = list(rng_states)
    return checkpoint


def restore_training(checkpoint: Mapping, model_without_ddp, optimizer, scheduler,
                     path: str = 'the checkpoint', scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Load a checkpoint written by `build_checkpoint` into the objects and return where to continue.

    `scaler` (fp16) takes the checkpoint's loss-scaler state; a checkpoint without one (older, or of an fp32/bf16
    run) leaves the scaler fresh.

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
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(dict(checkpoint['scaler']))
    ts = checkpoint.get('train_state')
    if ts is None:  # an original ALBEF checkpoint: resume at the next epoch, as the original does
        return TrainState(epoch=int(checkpoint['epoch']) + 1)
    if 'rng' in checkpoint:
        set_rng_state(rank_rng_state(checkpoint))
    return TrainState(epoch=ts['epoch'], step_in_epoch=ts['step_in_epoch'], global_step=ts['global_step'],
                      best=ts['best'], best_epoch=ts['best_epoch'], skipped_steps=int(ts.get('skipped_steps', 0)),
                      last_record=dict(ts.get('last_record') or {}))


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
        return None if is_int(checkpoint.get('epoch')) else \
            f"entry 'epoch' must be an int, got {checkpoint.get('epoch')!r:.40}"
    if not isinstance(ts, Mapping):
        return f"entry 'train_state' must be a dict, got {type(ts).__name__}"
    for key in ('epoch', 'step_in_epoch', 'global_step'):
        if key not in ts:
            return f"entry 'train_state' has no key {key!r}"
        if not is_int(ts[key]) or ts[key] < 0:
            return f"entry 'train_state' key {key!r} must be an int >= 0, got {ts[key]!r:.40}"
    for key, ok in (('best', lambda v: v is None or (is_number(v) and math.isfinite(v))),
                    ('best_epoch', lambda v: v is None or (is_int(v) and v >= 0))):
        if key not in ts:
            return f"entry 'train_state' has no key {key!r}"
        if not ok(ts[key]):
            return f"entry 'train_state' key {key!r} must be {'a number' if key == 'best' else 'an int'} or null, " \
                   f"got {ts[key]!r:.40}"
    if 'skipped_steps' in ts and not (is_int(ts['skipped_steps']) and ts['skipped_steps'] >= 0):
        return f"entry 'train_state' key 'skipped_steps' must be an int >= 0, got {ts['skipped_steps']!r:.40}"
    record = ts.get('last_record', {})
    if not isinstance(record, Mapping) or not all(isinstance(k, str) and is_number(v) for k, v in record.items()):
        return f"entry 'train_state' key 'last_record' must be a dict of numbers, got {record!r:.40}"
    return None


def check_training_state(checkpoint: Mapping, model_without_ddp, optimizer, scheduler,
                         path: str = 'the checkpoint') -> None:
    """Raise TrainingError naming `path` and what does not match, before anything of `checkpoint` is loaded:
    the model's tensors (keys, shapes, kinds of dtype, NaN/inf), the optimizer's groups and state shapes, the
    scheduler state, train_state and the RNG states."""
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
        if k in sched and is_number(v) and not (is_number(sched[k]) or sched[k] is None):
            fail(f"entry 'lr_scheduler' key {k!r} must be a number, got {sched[k]!r:.40}")
    problem = _train_state_problem(checkpoint)
    if problem is not None:
        fail(problem)
    scaler = checkpoint.get('scaler')
    if scaler is not None and not (isinstance(scaler, Mapping) and all(
            isinstance(k, str) and is_number(v) for k, v in scaler.items())):
        fail(f"entry 'scaler' must be a dict of numbers (a GradScaler state), got {str(scaler)[:40]}")
    if checkpoint.get('train_state') is not None and 'rng' in checkpoint:
        problem = rng_state_problem(checkpoint['rng'])
        if problem is not None:
            fail(f"entry 'rng' is malformed: {problem}")
        per_rank = checkpoint.get('rng_per_rank', [])
        if not isinstance(per_rank, (list, tuple)):
            fail(f"entry 'rng_per_rank' must be a list, got {type(per_rank).__name__}")
        for r, st in enumerate(per_rank):
            problem = rng_state_problem(st)
            if problem is not None:
                fail(f"entry 'rng_per_rank' is malformed at rank {r}: {problem}")


def first_non_finite_tensor(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer of `module` holding NaN or inf, or None."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_resume_checkpoint(checkpoint, model_without_ddp, path: str) -> None:
    """Refuse to resume from something that is not a training checkpoint of this model, with one line that says
    what it is instead (model weights only, another task's checkpoint, a model built with other options)."""
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
