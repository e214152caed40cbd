"""Optimizers for ALBEF training: the original's `create_optimizer` name table on top of torch and timm.

Public API:
* `create_optimizer(args, model, filter_bias_and_bn=True)`: build from the YAML `optimizer:` block.
* `optimizer_needs_create_graph(optimizer)`: True for AdaHessian (the engine then calls
  `backward(create_graph=True)`).
* `param_groups_weight_decay(model, weight_decay, skip)`: the original's no-decay / decay split.
* `NovoGrad`: the original's NovoGrad, the only optimizer written by hand here (see optim_factory).
"""
from optim.optim_factory import (OPTIMIZER_NAMES, NovoGrad, create_optimizer, optimizer_needs_create_graph,
                                 param_groups_weight_decay)
from optim.schema import OPTIMIZER_KEYS, OPTIMIZER_SCHEMA  # declares the config block to utils.config

__all__ = ['create_optimizer', 'optimizer_needs_create_graph', 'param_groups_weight_decay', 'NovoGrad',
           'OPTIMIZER_NAMES', 'OPTIMIZER_SCHEMA', 'OPTIMIZER_KEYS']
