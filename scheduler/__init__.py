"""Learning-rate schedulers for ALBEF training (the original's cosine / tanh / step / plateau semantics).

Public API: `create_scheduler(args, optimizer) -> (scheduler, num_epochs)` from the YAML `schedular:` block (the
caller may equally pass a `scheduler:` block: only the mapping is read), and the classes `CosineLRScheduler`,
`TanhLRScheduler`, `StepLRScheduler`, `PlateauLRScheduler` (each with `step(epoch[, metric])`, `state_dict()`,
`load_state_dict()`), and `PLATEAU_DEFAULT_METRIC`, the plateau schedule's default `eval_metric` (the training
loss). See scheduler_factory for where they differ from current timm.
"""
from scheduler.scheduler_factory import (PLATEAU_DEFAULT_METRIC, SCHEDULER_NAMES, CosineLRScheduler,
                                         PlateauLRScheduler, StepLRScheduler, TanhLRScheduler, create_scheduler)
from scheduler.schema import SCHEDULER_KEYS, SCHEDULER_SCHEMA  # declares the config block to utils.config

__all__ = ['create_scheduler', 'CosineLRScheduler', 'TanhLRScheduler', 'StepLRScheduler', 'PlateauLRScheduler',
           'SCHEDULER_NAMES', 'SCHEDULER_SCHEMA', 'SCHEDULER_KEYS', 'PLATEAU_DEFAULT_METRIC']
