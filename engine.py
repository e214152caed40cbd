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


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


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


def restore_training(checkpoint: Mapping, model_without_ddp, optimizer, scheduler) -> TrainState:
    """Load a checkpoint written by `build_checkpoint` into the objects and return where to continue."""
    model_without_ddp.load_state_dict(checkpoint['model'], strict=True)
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['lr_scheduler'])
    ts = checkpoint.get('train_state')
    if ts is None:  # an original ALBEF checkpoint: resume at the next epoch, as the original does
        return TrainState(epoch=int(checkpoint['epoch']) + 1)
    if 'rng' in checkpoint:
        set_rng_state(checkpoint['rng'])
    return TrainState(epoch=ts['epoch'], step_in_epoch=ts['step_in_epoch'], global_step=ts['global_step'],
                      best=ts['best'], best_epoch=ts['best_epoch'])


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
    if not isinstance(saved, Mapping) or set(saved) == set(expected):
        return
    try:
        saved_kind, model_kind = detect_kind(saved), detect_kind(expected)
    except CheckpointError:
        saved_kind = model_kind = None
    if saved_kind != model_kind:
        raise TrainingError(f"{path}: cannot resume a '{model_kind}' run from a '{saved_kind}' checkpoint; to start "
                            f"from its weights, pass it with --checkpoint and without --resume")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    raise TrainingError(f'{path}: cannot resume, the checkpoint holds another model (missing {missing[:3]}, '
                        f'unexpected {unexpected[:3]}); was it made with other model options?')


def check_resume_config(saved: Mapping, current: Mapping, path: str) -> None:
    """Refuse to resume a run whose model or data shape differs from the checkpoint's config."""
    keys = ('bert_config', 'image_res', 'patch_size', 'vision_width', 'vision_depth', 'embed_dim', 'queue_size',
            'batch_size', 'batch_size_train', 'train_file', 'optimizer')
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        k = diffs[0]
        raise TrainingError(f'{path}: cannot resume, the checkpoint was made with another config '
                            f'({k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now)')


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
        batch = next(iterator)
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
        best_metric: str | None = None, save_epoch_checkpoints: bool = True) -> TrainState:
    """Train for `num_epochs`, evaluating after each epoch, logging one JSON line per epoch and checkpointing.

    Checkpoints: `checkpoint_last.pth` (resume point: every epoch end and every `save_every_steps`),
    `checkpoint_XX.pth` when `save_epoch_checkpoints` (every `epoch_checkpoint_every` epochs, and the last epoch),
    and `checkpoint_best.pth` whenever `evaluate_fn(epoch)[best_metric]` improves.
    """
    state = state or TrainState()
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, 'log.txt')
    sampler = getattr(train_loader, 'sampler', None)

    def save(s: TrainState, name: str = 'checkpoint_last.pth') -> None:
        bad = first_non_finite_tensor(model_without_ddp)
        if bad is not None:  # never replace the last good checkpoint by a diverged one
            raise TrainingError(f'non-finite weights ({bad}) when saving {name} (epoch {s.epoch}, {s.step_in_epoch} '
                                f'steps done): training diverged; stopping (the last good checkpoint is kept)')
        if utils.is_main_process():
            utils.atomic_save(build_checkpoint(model_without_ddp, optimizer, scheduler, config, s),
                              os.path.join(output_dir, name))
        utils.barrier()

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
        train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, step_fn, device, engine_cfg,
                                      state, save_fn=save)
        record = {f'train_{k}': v for k, v in train_stats.items()}
        improved = False
        if evaluate_fn is not None:
            eval_stats = evaluate_fn(epoch)
            record.update(eval_stats)
            if best_metric is not None:
                value = float(eval_stats[best_metric])
                if state.best is None or value > state.best:
                    state.best, state.best_epoch, improved = value, epoch, True
        record['epoch'] = epoch
        record['time_s'] = round(time.time() - start_time, 1)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if utils.is_main_process():
            utils.append_json_line(log_path, record)
        last_record = record
        if save_epoch_checkpoints and _keeps_epoch_checkpoint(engine_cfg.epoch_checkpoint_every, epoch, num_epochs):
            save(state, f'checkpoint_{epoch:02d}.pth')
        if improved:
            save(state, 'checkpoint_best.pth')
        save(state)
    if best_metric is not None and utils.is_main_process() and state.best_epoch is not None:
        utils.append_json_line(log_path, {'best_epoch': state.best_epoch, f'best_{best_metric}': state.best})
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


def resume_training(args, config: Mapping, model_without_ddp, optimizer, lr_scheduler) -> TrainState:
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
    state = restore_training(checkpoint, model_without_ddp, optimizer, lr_scheduler)
    if utils.is_main_process():  # only now: a refused resume must leave the run's config.yaml as it was
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))
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
    state = resume_training(args, config, model_without_ddp, optimizer, lr_scheduler)
    cfg = engine_config(config, save_every_steps=args.save_every_steps, max_steps_per_epoch=args.max_steps_per_epoch,
                        **engine_overrides)
    return fit(model=model, model_without_ddp=model_without_ddp, train_loader=train_loader, optimizer=optimizer,
               scheduler=lr_scheduler, step_fn=step_fn, config=config, engine_cfg=cfg, device=device,
               output_dir=args.output_dir, num_epochs=num_epochs, state=state, evaluate_fn=evaluate_fn,
               best_metric=best_metric, save_epoch_checkpoints=save_epoch_checkpoints)
