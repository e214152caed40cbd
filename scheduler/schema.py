"""The `schedular:` config block (the original's spelling; `scheduler:` is accepted too): its keys, their types
and ranges (create_scheduler applies the defaults).

Declared to utils.config when this package is imported, so that every validated config has its block checked.
"""
from typing import Mapping

from utils.config import register_block, register_check
from utils.errors import ConfigError
from utils.schema import NONE, NUM, RATE, Spec

SCHEDULER_SCHEMA: dict[str, Spec] = {
    'sched': Spec((str,)), 'lr': RATE, 'epochs': Spec(NUM, 0, lo_open=True), 'min_lr': RATE,
    'decay_rate': Spec(NUM, 0), 'warmup_lr': RATE, 'warmup_epochs': Spec(NUM, 0), 'cooldown_epochs': Spec(NUM, 0),
    'decay_epochs': Spec(NUM, 0, lo_open=True), 'patience_epochs': Spec((int,), 0), 'eval_metric': Spec((str,)),
    'lr_noise': Spec(NUM + (list, NONE), 0, items=Spec(NUM, 0)), 'lr_noise_pct': Spec(NUM, 0),
    'lr_noise_std': Spec(NUM, 0), 'lr_cycle_mul': Spec(NUM, 0, lo_open=True),
    'lr_cycle_limit': Spec((int,), 1), 'seed': Spec((int,)),
}
SCHEDULER_KEYS = set(SCHEDULER_SCHEMA)


def _one_spelling(path: str, config: Mapping) -> None:
    if 'schedular' in config and 'scheduler' in config:
        raise ConfigError(f"{path}: give either 'schedular' (original spelling) or 'scheduler', not both")


for _name in ('schedular', 'scheduler'):
    register_block(_name, SCHEDULER_SCHEMA, required=('sched', 'epochs'))
register_check(_one_spelling)
