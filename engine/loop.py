"""The loop: one epoch of steps (loss sum, alpha ramp, warm-up stepping, autocast, fp16 loss scaling, gradient
accumulation, non-finite stop), `fit` over epochs with evaluation, logging and checkpoints, and `train`, what every
task script calls."""
from __future__ import annotations

import inspect
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

import utils
from engine.build import build_optimizer_and_scheduler, resume_training
from engine.errors import TrainingError
from engine.guard import RunGuard, append_log_line, next_batch, save_checkpoint_file, worker_death_error
from engine.precision import autocast, grad_scaler, scaled_optimizer_step
from engine.rng import gather_rng_states
from engine.state import TrainState, build_checkpoint, first_non_finite_tensor
from optim import consolidate_optimizer_state, optimizer_needs_create_graph
from scheduler import PLATEAU_DEFAULT_METRIC, PlateauLRScheduler

StepFn = Callable[[torch.nn.Module, object, float], Mapping[str, torch.Tensor]]


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
    allow_cpu_fp16: bool = False   # tests / benchmark tiny mode only: fp16 autocast on CPU (slow, same arithmetic)


def _alpha_for(cfg: EngineConfig, epoch: int, i: int, n: int) -> float:
    if epoch > 0 or not cfg.warm_up:
        return cfg.alpha
    return cfg.alpha * min(1.0, i / n)


def _divergence(model: torch.nn.Module, error: RuntimeError) -> str | None:
    """Why a forward that raised `error` failed, when the cause is non-finite numbers; None for other errors."""
    bad = first_non_finite_tensor(model)
    if bad is not None:
        return f'non-finite weights ({bad})'
    first = (str(error).strip().splitlines() or [''])[0]
    if re.search(r'\b(nan|inf)\b', first, re.IGNORECASE):  # e.g. torch.multinomial on NaN probabilities
        return f'non-finite values inside the forward ({first[:120]})'
    return None


def _warmup_step_due(cfg: EngineConfig, scheduler, epoch: int, i: int) -> bool:
    """The original's warm-up: in epoch 0, step the scheduler every 100 iterations up to warmup_steps. Without a
    warm-up a plateau schedule gets no such call (it would need a metric that does not exist yet); the other
    schedules keep the original's step(0)."""
    if epoch != 0 or i % 100 != 0 or i > 100 * cfg.warmup_steps:
        return False
    return cfg.warmup_steps > 0 or not isinstance(scheduler, PlateauLRScheduler)


def train_one_epoch(model, loader, optimizer, scheduler, step_fn: StepFn, device: torch.device,
                    cfg: EngineConfig, state: TrainState, save_fn: Callable[[TrainState], None] | None = None,
                    header: str = 'Train', scaler: torch.amp.GradScaler | None = None,
                    guard: RunGuard | None = None) -> dict[str, float]:
    """Train for one epoch, starting at `state.step_in_epoch`; returns the epoch's average of each loss, of their
    sum (`loss`, unless the step names a loss so itself) and of the lr.

    With `scaler` (fp16) the loss is scaled before backward and each optimizer step is skipped when a gradient is
    inf/NaN; the returned `skipped_steps` counts the epoch's skipped steps.
    """
    model.train()
    logger = utils.MetricLogger(window_size=50)
    epoch, start = state.epoch, state.step_in_epoch
    if start == 0:
        state.skipped_steps = 0
    n_total = start + len(loader)
    if cfg.max_steps_per_epoch:
        n_total = min(n_total, cfg.max_steps_per_epoch)
    create_graph = optimizer_needs_create_graph(optimizer)
    if scaler is not None and create_graph:
        raise utils.ConfigError('precision fp16 (loss scaling) cannot train with a second-order optimizer '
                                '(adahessian differentiates unscaled gradients); use bf16 or fp32')
    loss_names: list[str] = []
    optimizer.zero_grad(set_to_none=True)
    iterator = iter(loader)
    for i in logger.log_every(range(start, n_total), cfg.print_freq, f'{header} epoch [{epoch}]'):
        batch = next_batch(iterator, loader)
        alpha = _alpha_for(cfg, epoch, i, n_total)
        with autocast(device, cfg.precision, allow_cpu_fp16=cfg.allow_cpu_fp16):
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
        loss_names = loss_names or list(losses)
        if not torch.isfinite(loss.detach()).all():
            values = ', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())
            raise TrainingError(f'non-finite loss at epoch {epoch} step {i}: {values}; stopping '
                                f'(the last good checkpoint is kept)')
        if scaler is None:
            (loss / cfg.grad_accum_steps).backward(create_graph=create_graph)
        else:
            scaler.scale(loss / cfg.grad_accum_steps).backward()
        if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == n_total:
            if scaler is None:
                optimizer.step()
            elif scaled_optimizer_step(scaler, optimizer):
                state.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
        if _warmup_step_due(cfg, scheduler, epoch, i):
            scheduler.step(i // 100)
        logger.update(lr=optimizer.param_groups[0]['lr'], **{k: v.detach().float() for k, v in losses.items()})
        state.step_in_epoch = i + 1
        state.global_step += 1
        if save_fn is not None and cfg.save_every_steps and state.step_in_epoch % cfg.save_every_steps == 0 \
                and state.step_in_epoch < n_total:
            save_fn(state)
        if guard is not None:
            guard.stop_if_terminated()
    logger.synchronize_between_processes()
    print(f'Averaged stats: {logger.global_avg()}', flush=True)
    stats = logger.averages()
    if loss_names and 'loss' not in stats:  # the mean of the summed loss is the sum of the terms' means
        stats['loss'] = sum(stats[k] for k in loss_names if k in stats)
    if scaler is not None:  # every rank sees the same all-reduced gradients, hence the same skips
        stats['skipped_steps'] = state.skipped_steps
    return stats


def _plateau_metric(config: Mapping) -> str:
    return str(config['schedular'].get('eval_metric', PLATEAU_DEFAULT_METRIC))


def _step_scheduler(scheduler, t: int, config: Mapping, last_record: Mapping) -> None:
    """Epoch-level scheduler step; a plateau schedule also gets last epoch's `schedular.eval_metric` value (looked
    up as given, then with a `train_` prefix: the default `loss` is the epoch's mean training loss, `train_loss`)."""
    if not isinstance(scheduler, PlateauLRScheduler):
        scheduler.step(t)
        return
    key = _plateau_metric(config)
    for name in (key, f'train_{key}'):
        if name in last_record:
            scheduler.step(t, float(last_record[name]))
            return
    raise TrainingError(f"schedular.eval_metric '{key}' is not among last epoch's metrics "
                        f"({', '.join(sorted(last_record)) or 'none recorded'}); name one of them")


def _resumes_mid_epoch(sampler) -> bool:
    """Whether `sampler` can start an epoch at a given batch (dataset.resumable.ResumableSampler's
    `set_epoch(epoch, start_batch)`). Recognised by that signature rather than by class, so that the engine does not
    import the dataset package (image transforms, OpenCV): benchmarks/gpu_check.py runs the engine without them."""
    set_epoch = getattr(sampler, 'set_epoch', None)
    return set_epoch is not None and 'start_batch' in inspect.signature(set_epoch).parameters


def _keeps_epoch_checkpoint(every: int, epoch: int, num_epochs: int) -> bool:
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == num_epochs)


def fit(*, model, model_without_ddp, train_loader, optimizer, scheduler, step_fn: StepFn, config: Mapping,
        engine_cfg: EngineConfig, device: torch.device, output_dir: str, num_epochs: int,
        state: TrainState | None = None, evaluate_fn: Callable[[int], dict] | None = None,
        best_metric: str | None = None, save_epoch_checkpoints: bool = True,
        guard: RunGuard | None = None, scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Train for `num_epochs`, evaluating after each epoch, logging one JSON line per epoch and checkpointing.

    Checkpoints: `checkpoint_last.pth` (resume point: every epoch end and every `save_every_steps`),
    `checkpoint_XX.pth` when `save_epoch_checkpoints` (every `epoch_checkpoint_every` epochs, and the last epoch),
    and `checkpoint_best.pth` whenever `evaluate_fn(epoch)[best_metric]` improves.
    `guard` (see RunGuard; `train` installs one for SIGTERM) records each resume point written; a write that
    fails for lack of space or permission ends the run with one line naming the file, earlier files intact.
    `scaler`: the fp16 loss scaler (made here when the precision is fp16 and none is given; restore a resumed
    run's with `restore_training(..., scaler=)`); its state goes into every checkpoint.
    """
    state = state or TrainState()
    if scaler is None:
        scaler = grad_scaler(device, engine_cfg.precision)
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
            consolidate_optimizer_state(optimizer)  # ZeRO: every rank sends its shard to rank 0
            rng_states = gather_rng_states()  # each rank's own, for an exact multi-rank resume
            if utils.is_main_process():
                save_checkpoint_file(build_checkpoint(model_without_ddp, optimizer, scheduler, config, s, scaler,
                                                      rng_states), path, guard)
            utils.barrier()
            if name == 'checkpoint_last.pth':
                guard.keep(path, s)

    start_time = time.time()
    last_record: dict = dict(state.last_record)  # a resumed plateau run: the epoch before the checkpoint
    plateau = isinstance(scheduler, PlateauLRScheduler)
    while state.epoch < num_epochs:
        epoch = state.epoch
        if _resumes_mid_epoch(sampler):
            sampler.set_epoch(epoch, start_batch=state.step_in_epoch)
        elif hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        if epoch > 0 and state.step_in_epoch == 0:
            _step_scheduler(scheduler, epoch + engine_cfg.warmup_steps, config, last_record)
        try:
            train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, step_fn, device, engine_cfg,
                                          state, save_fn=save, scaler=scaler, guard=guard)
            eval_stats = evaluate_fn(epoch) if evaluate_fn is not None else None
            guard.stop_if_terminated()
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
        if plateau:  # what the next epoch's scheduler step reads, kept in checkpoints for a resume at this point
            key = _plateau_metric(config)
            state.last_record = {k: float(v) for k, v in record.items()
                                 if k in (key, f'train_{key}') and isinstance(v, (int, float))}
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
        cfg = engine_config(config, save_every_steps=args.save_every_steps,
                            max_steps_per_epoch=args.max_steps_per_epoch, **engine_overrides)
        scaler = grad_scaler(device, cfg.precision)
        state = resume_training(args, config, model_without_ddp, optimizer, lr_scheduler, guard=guard,
                                scaler=scaler)
        return fit(model=model, model_without_ddp=model_without_ddp, train_loader=train_loader, optimizer=optimizer,
                   scheduler=lr_scheduler, step_fn=step_fn, config=config, engine_cfg=cfg, device=device,
                   output_dir=args.output_dir, num_epochs=num_epochs, state=state, evaluate_fn=evaluate_fn,
                   best_metric=best_metric, save_epoch_checkpoints=save_epoch_checkpoints, guard=guard,
                   scaler=scaler)
