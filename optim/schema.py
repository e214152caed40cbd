"""The `optimizer:` config block: its keys, their types and ranges (create_optimizer applies the defaults).

Declared to utils.config when this package is imported, so that every validated config has its block checked.
"""
from utils.config import register_block
from utils.schema import NONE, NUM, RATE, Spec

OPTIMIZER_SCHEMA: dict[str, Spec] = {
    'opt': Spec((str,)), 'lr': RATE, 'weight_decay': RATE, 'momentum': Spec(NUM + (NONE,), 0, 1),
    'opt_eps': Spec(NUM + (NONE,), 0), 'opt_betas': Spec((list,), items=Spec(NUM, 0, 1, hi_open=True)),
    'opt_args': Spec((dict, NONE)), 'filter_bias_and_bn': Spec((bool,)),
}
OPTIMIZER_KEYS = set(OPTIMIZER_SCHEMA)

register_block('optimizer', OPTIMIZER_SCHEMA, required=('opt', 'lr'))
