"""Learning-rate schedulers with the original ALBEF (timm 0.4) semantics, built on timm 1.0's scheduler classes.

`create_scheduler(args, optimizer)` reads the YAML `schedular:` block and returns
`(scheduler, num_epochs)`. The schedulers follow timm's protocol: `step(epoch)` sets every parameter group's lr to
the value for `epoch` (ALBEF also calls it with `i // 100` during the epoch-0 warm-up), and
`state_dict()` / `load_state_dict()` capture everything needed to resume exactly.

Where current timm's formulas differ from the original's, the subclasses below restore the original:

* cosine: timm's formula, with warm-up as a *prefix* (`warmup_prefix=True`, the original ALBEF class default;
  current timm defaults to False, which makes the lr jump down after warm-up). Beyond one cycle, the cycle's
  minimum is decayed with the cycle (`lr_min * decay_rate**i`; timm 1.0 keeps it fixed) and `cycle_limit=0`
  means unlimited cycles; the cycle length reported to the factory excludes the warm-up (so
  `num_epochs = epochs + cooldown_epochs` as in the original).
* tanh: lb -6, ub 4, no warm-up prefix (the warm-up slope aims at lr(warmup_t)); minimum decayed with the cycle;
  beyond the cycle limit the lr is `lr_min * decay_rate**cycle_limit`; `cycle_limit=0` means unlimited.
* step: no warm-up prefix (timm 1.0 defaults to a prefix): `lr = base * decay_rate**floor(t / decay_epochs)`.
* plateau: torch's ReduceLROnPlateau (timm's PlateauLRScheduler is deprecated) with the original's linear
  warm-up for `epoch <= warmup_epochs`. Fixes: without warm-up (`warmup_epochs` 0) `step(0)` no longer sets the lr
  to `warmup_lr`; the state dict holds the whole torch scheduler state (the original kept only `best` and
  `last_epoch`, losing the patience counters on resume; the original two-key form still loads); the default
  metric is the training loss (`PLATEAU_DEFAULT_METRIC`, mode min) where the original defaulted to `top1` (mode
  max), a key no ALBEF task logs.

LR noise (`lr_noise`, `lr_noise_pct`, `lr_noise_std`, `seed`) works as in timm: a normal sample (times
`lr_noise_std`, which the original accepted but ignored: identical for the default 1.0) redrawn until its
magnitude is below `lr_noise_pct`, seeded with `seed + t`, applied as `lr * (1 + noise)` inside the noise range.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, List, Mapping

import torch
from timm.scheduler import CosineLRScheduler as _TimmCosine
from timm.scheduler import StepLRScheduler as _TimmStep
from timm.scheduler import TanhLRScheduler as _TimmTanh
from timm.scheduler.scheduler import Scheduler

from utils import ConfigError

__all__ = ['create_scheduler', 'CosineLRScheduler', 'TanhLRScheduler', 'StepLRScheduler', 'PlateauLRScheduler',
           'SCHEDULER_NAMES', 'PLATEAU_DEFAULT_METRIC']

SCHEDULER_NAMES = ('cosine', 'tanh', 'step', 'plateau')

#: The plateau schedule's default `eval_metric`: the epoch's mean training loss (the sum of the step's loss terms),
#: which the engine logs as `train_loss` for every task; mode 'min'. Any other key of the epoch's log line may be
#: named instead (e.g. `val_r_mean`, mode 'max').
PLATEAU_DEFAULT_METRIC = 'loss'


def _cycle_index(t: float, t_initial: float, cycle_mul: float) -> tuple[int, float, float]:
    """(cycle index i, cycle length t_i, position t_curr inside the cycle) for t counted from the cycle start."""
    if cycle_mul != 1:
        i = math.floor(math.log(1 - t / t_initial * (1 - cycle_mul), cycle_mul))
        t_i = cycle_mul ** i * t_initial
        t_curr = t - (1 - cycle_mul ** i) / (1 - cycle_mul) * t_initial
    else:
        i = t // t_initial
        t_i = t_initial
        t_curr = t - t_initial * i
    return i, t_i, t_curr


def _original_cycle_length(t_initial: float, cycle_mul: float, cycle_limit: int, cycles: int = 0) -> float:
    cycles = max(1, cycles or cycle_limit)
    if cycle_mul == 1.0:
        return t_initial * cycles
    return int(math.floor(-t_initial * (cycle_mul ** cycles - 1) / (1 - cycle_mul)))


def _in_cycle_limit(i: int, cycle_limit: int) -> bool:
    return cycle_limit == 0 or (cycle_limit > 0 and i < cycle_limit)


class CosineLRScheduler(_TimmCosine):
    """timm's CosineLRScheduler with the original's defaults and cycle rules (see the module docstring). Defaults
    as the original ALBEF class: `warmup_prefix=True`. With warm-up the lr is set to `warmup_lr_init` at
    construction.

    lr(t) = w + t (b - w) / Wt for t < Wt; else with t' = t - Wt (prefix), cycle i and position t_c of length T_i:
    lr = m d^i + (b d^i - m d^i)(1 + cos(pi t_c / T_i)) / 2 inside the cycle limit, m beyond it. timm computes
    exactly this (tests/test_scheduler.py steps both over every shipped config) except for a decayed minimum in
    a later cycle (timm keeps m) and `cycle_limit=0` (timm: no cycle at all); only those two are computed here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min: float = 0., cycle_mul: float = 1.,
                 cycle_decay: float = 1., cycle_limit: int = 1, warmup_t: int = 0, warmup_lr_init: float = 0.,
                 warmup_prefix: bool = True, t_in_epochs: bool = True, noise_range_t=None, noise_pct: float = 0.67,
                 noise_std: float = 1.0, noise_seed: int = 42, initialize: bool = True) -> None:
        super().__init__(optimizer, t_initial=t_initial, lr_min=lr_min, cycle_mul=cycle_mul, cycle_decay=cycle_decay,
                         cycle_limit=cycle_limit, warmup_t=warmup_t, warmup_lr_init=warmup_lr_init,
                         warmup_prefix=warmup_prefix, t_in_epochs=t_in_epochs, noise_range_t=noise_range_t,
                         noise_pct=noise_pct, noise_std=noise_std, noise_seed=noise_seed, initialize=initialize)

    def _timm_is_original(self) -> bool:
        """Whether timm's formula is the original's for this schedule (one cycle, the default, always is)."""
        return self.cycle_limit == 1 or (self.cycle_limit != 0 and (self.cycle_decay == 1 or self.lr_min == 0))

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t or self._timm_is_original():
            return super()._get_lr(t)
        if self.warmup_prefix:
            t = t - self.warmup_t
        i, t_i, t_curr = _cycle_index(t, self.t_initial, self.cycle_mul)
        if not _in_cycle_limit(i, self.cycle_limit):
            return [self.lr_min for _ in self.base_values]
        gamma = self.cycle_decay ** i
        lr_min = self.lr_min * gamma
        return [lr_min + 0.5 * (b * gamma - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))
                for b in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> float:
        """Length of `cycles` cycles (default: cycle_limit) without the warm-up, as the original reports it (timm
        adds the warm-up prefix)."""
        return _original_cycle_length(self.t_initial, self.cycle_mul, self.cycle_limit, cycles)


class TanhLRScheduler(_TimmTanh):
    """timm's TanhLRScheduler with the original formulas and defaults (lb -6, ub 4, no warm-up prefix).

    Inside the cycle limit lr = m d^i + (b d^i - m d^i)(1 - tanh(lb (1 - r) + ub r)) / 2 with r = t_c / T_i;
    beyond it lr = m d^cycle_limit. The warm-up goes linearly from w to lr(Wt).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lb: float = -6., ub: float = 4.,
                 lr_min: float = 0., cycle_mul: float = 1., cycle_decay: float = 1., cycle_limit: int = 1,
                 warmup_t: int = 0, warmup_lr_init: float = 0., warmup_prefix: bool = False, t_in_epochs: bool = True,
                 noise_range_t=None, noise_pct: float = 0.67, noise_std: float = 1.0, noise_seed: int = 42,
                 initialize: bool = True) -> None:
        super().__init__(optimizer, t_initial=t_initial, lb=lb, ub=ub, lr_min=lr_min, cycle_mul=cycle_mul,
                         cycle_decay=cycle_decay, cycle_limit=cycle_limit, warmup_t=warmup_t,
                         warmup_lr_init=warmup_lr_init, warmup_prefix=warmup_prefix, t_in_epochs=t_in_epochs,
                         noise_range_t=noise_range_t, noise_pct=noise_pct, noise_std=noise_std,
                         noise_seed=noise_seed, initialize=initialize)

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.warmup_prefix:
            t = t - self.warmup_t
        i, t_i, t_curr = _cycle_index(t, self.t_initial, self.cycle_mul)
        if not _in_cycle_limit(i, self.cycle_limit):
            return [self.lr_min * (self.cycle_decay ** self.cycle_limit) for _ in self.base_values]
        gamma = self.cycle_decay ** i
        lr_min = self.lr_min * gamma
        tr = t_curr / t_i
        return [lr_min + 0.5 * (b * gamma - lr_min) * (1 - math.tanh(self.lb * (1. - tr) + self.ub * tr))
                for b in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> float:
        """Length of `cycles` cycles (default: cycle_limit) without the warm-up, as the original reports it."""
        return _original_cycle_length(self.t_initial, self.cycle_mul, self.cycle_limit, cycles)


class StepLRScheduler(_TimmStep):
    """timm's StepLRScheduler without warm-up prefix (the original): lr = b d^floor(t / decay_t) after warm-up."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay_t: float, decay_rate: float = 1., warmup_t: int = 0,
                 warmup_lr_init: float = 0., warmup_prefix: bool = False, t_in_epochs: bool = True,
                 noise_range_t=None, noise_pct: float = 0.67, noise_std: float = 1.0, noise_seed: int = 42,
                 initialize: bool = True) -> None:
        super().__init__(optimizer, decay_t=decay_t, decay_rate=decay_rate, warmup_t=warmup_t,
                         warmup_lr_init=warmup_lr_init, warmup_prefix=warmup_prefix, t_in_epochs=t_in_epochs,
                         noise_range_t=noise_range_t, noise_pct=noise_pct, noise_std=noise_std,
                         noise_seed=noise_seed, initialize=initialize)


class PlateauLRScheduler(Scheduler):
    """Reduce-on-plateau (torch.optim.lr_scheduler.ReduceLROnPlateau) with the original's linear warm-up.

    `step(epoch, metric)`: for 0 < Wt and epoch <= Wt the lr is `w + epoch (b - w) / Wt`; afterwards the torch
    scheduler is stepped with `metric` (required then) and optional noise is applied on top (and undone before
    the next torch step, so the noise never compounds). `step_update` does nothing (epoch-based only).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay_rate: float = 0.1, patience_t: int = 10,
                 threshold: float = 1e-4, cooldown_t: int = 0, warmup_t: int = 0, warmup_lr_init: float = 0.,
                 lr_min: float = 0., mode: str = 'max', noise_range_t=None, noise_type: str = 'normal',
                 noise_pct: float = 0.67, noise_std: float = 1.0, noise_seed: int | None = None,
                 initialize: bool = True) -> None:
        super().__init__(optimizer, 'lr', t_in_epochs=True, noise_range_t=noise_range_t, noise_type=noise_type,
                         noise_pct=noise_pct, noise_std=noise_std, noise_seed=noise_seed, initialize=initialize)
        self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=mode, factor=decay_rate, patience=patience_t, threshold=threshold,
            cooldown=cooldown_t, min_lr=lr_min)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if self.warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / self.warmup_t for v in self.base_values]
            self.update_groups(self.warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]
        self.restore_lr: list[float] | None = None

    def _get_lr(self, t: int) -> List[float]:
        if self.warmup_t and t <= self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        return [float(g['lr']) for g in self.optimizer.param_groups]

    def step(self, epoch: int, metric: float | None = None) -> None:
        """Set the lr for `epoch` (warm-up) or step ReduceLROnPlateau with `metric`."""
        self.metric = metric
        if self.warmup_t and epoch <= self.warmup_t:
            self.update_groups(self._get_lr(epoch))
            return
        if metric is None:
            raise ValueError(f'PlateauLRScheduler.step({epoch}): a metric is required after the warm-up')
        if self.restore_lr is not None:
            # undo the previous noise before the torch scheduler looks at the lr
            for group, lr in zip(self.optimizer.param_groups, self.restore_lr):
                group['lr'] = lr
            self.restore_lr = None
        self.lr_scheduler.last_epoch = epoch - 1  # torch counts from last_epoch; its `epoch` argument is deprecated
        self.lr_scheduler.step(metric)
        if self._is_apply_noise(epoch):
            noise = self._calculate_noise(epoch)
            self.restore_lr = [float(g['lr']) for g in self.optimizer.param_groups]
            for group, lr in zip(self.optimizer.param_groups, self.restore_lr):
                group['lr'] = lr + lr * noise

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        """Epoch-based only: per-update stepping does nothing (as in the original)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ('optimizer', 'lr_scheduler')}
        state['lr_scheduler'] = self.lr_scheduler.state_dict()
        # the original's two keys, kept so checkpoints stay readable by code that expects them
        state['best'] = self.lr_scheduler.best
        state['last_epoch'] = self.lr_scheduler.last_epoch
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        torch_state = state.pop('lr_scheduler', None)
        best, last_epoch = state.pop('best', None), state.pop('last_epoch', None)
        self.__dict__.update(state)
        if torch_state is not None:
            self.lr_scheduler.load_state_dict(torch_state)
        else:  # the original's format
            if best is not None:
                self.lr_scheduler.best = best
            if last_epoch is not None:
                self.lr_scheduler.last_epoch = last_epoch


def _get(args: Any, key: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(key, default)
    return getattr(args, key, default)


def _number(args: Any, key: str, default: Any = None, required: bool = False, cast=float):
    value = _get(args, key, default)
    if value is None:
        if required:
            raise ConfigError(f"schedular: '{key}' is missing (sched={_get(args, 'sched')!r})")
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"schedular: '{key}' must be a number, got {value!r}") from None


@contextlib.contextmanager
def _quiet_timm_cosine():
    """Silence timm's 'will have no effect ... t_initial = 1' warning: with a warm-up prefix (NLVR_pretrain: one
    epoch) the schedule does have an effect, so the message would only mislead."""
    log = logging.getLogger('timm.scheduler.cosine_lr')
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _epoch_count(value: float):
    """Epoch counts stay ints when they are whole numbers (they index epochs)."""
    return int(value) if float(value).is_integer() else value


def create_scheduler(args: Any, optimizer: torch.optim.Optimizer):
    """Build the scheduler of the YAML `schedular:` block; returns `(scheduler, num_epochs)`.

    Keys: `sched` (cosine | tanh | step | plateau, case-insensitive), `epochs` (required),
    `min_lr` (0), `decay_rate` (1 for cosine/tanh, 0.1 for step/plateau), `warmup_lr` (0), `warmup_epochs` (0),
    `cooldown_epochs` (0), `decay_epochs` (step, required), `patience_epochs` (plateau, 10), `eval_metric`
    (plateau: a key of the epoch's log line, mode 'min' if it contains 'loss', else 'max'; default
    PLATEAU_DEFAULT_METRIC, the training loss), `lr_cycle_mul` (1),
    `lr_cycle_limit` (1), `lr_noise` (None: a fraction of `epochs` or a [start, end] list of fractions),
    `lr_noise_pct` (0.67), `lr_noise_std` (1), `seed` (42). The block's `lr` is ignored: the base lr is the
    optimizer's, as in the original.

    num_epochs = epochs * cycles + cooldown_epochs for cosine/tanh, `epochs` otherwise (ALBEF ignores it).
    Raises utils.ConfigError naming the bad key.
    """
    sched = _get(args, 'sched')
    if not isinstance(sched, str) or sched.lower() not in SCHEDULER_NAMES:
        raise ConfigError(f"schedular: unknown sched {sched!r}; known: {', '.join(SCHEDULER_NAMES)}")
    sched = sched.lower()
    num_epochs = _epoch_count(_number(args, 'epochs', required=True))
    if num_epochs <= 0:
        raise ConfigError(f"schedular: 'epochs' must be positive, got {num_epochs}")
    min_lr = _number(args, 'min_lr', 0.)
    warmup_lr = _number(args, 'warmup_lr', 0.)
    warmup_epochs = _epoch_count(_number(args, 'warmup_epochs', 0))
    cooldown_epochs = _epoch_count(_number(args, 'cooldown_epochs', 0))
    decay_rate = _number(args, 'decay_rate', 1. if sched in ('cosine', 'tanh') else 0.1)
    if warmup_epochs < 0:
        raise ConfigError(f"schedular: 'warmup_epochs' must be >= 0, got {warmup_epochs}")

    lr_noise = _get(args, 'lr_noise')
    if lr_noise is None:
        noise_range = None
    elif isinstance(lr_noise, (list, tuple)):
        noise_range = [n * num_epochs for n in lr_noise]
        if len(noise_range) == 1:
            noise_range = noise_range[0]
    else:
        noise_range = _number(args, 'lr_noise') * num_epochs
    noise = dict(noise_range_t=noise_range, noise_pct=_number(args, 'lr_noise_pct', 0.67),
                 noise_std=_number(args, 'lr_noise_std', 1.), noise_seed=_number(args, 'seed', 42, cast=int))

    if sched in ('cosine', 'tanh'):
        cls = CosineLRScheduler if sched == 'cosine' else TanhLRScheduler
        with _quiet_timm_cosine():
            scheduler = cls(optimizer, t_initial=num_epochs, lr_min=min_lr,
                            cycle_mul=_number(args, 'lr_cycle_mul', 1.), cycle_decay=decay_rate,
                            cycle_limit=_number(args, 'lr_cycle_limit', 1, cast=int), warmup_t=warmup_epochs,
                            warmup_lr_init=warmup_lr, t_in_epochs=True, **noise)
        num_epochs = scheduler.get_cycle_length() + cooldown_epochs
    elif sched == 'step':
        decay_epochs = _number(args, 'decay_epochs', required=True)
        if decay_epochs <= 0:
            raise ConfigError(f"schedular: 'decay_epochs' must be positive, got {decay_epochs}")
        scheduler = StepLRScheduler(optimizer, decay_t=decay_epochs, decay_rate=decay_rate, warmup_t=warmup_epochs,
                                    warmup_lr_init=warmup_lr, **noise)
    else:
        mode = 'min' if 'loss' in str(_get(args, 'eval_metric', PLATEAU_DEFAULT_METRIC)) else 'max'
        scheduler = PlateauLRScheduler(optimizer, decay_rate=decay_rate,
                                       patience_t=_number(args, 'patience_epochs', 10, cast=int), lr_min=min_lr,
                                       mode=mode, warmup_lr_init=warmup_lr, warmup_t=warmup_epochs, cooldown_t=0,
                                       **noise)
    return scheduler, num_epochs
