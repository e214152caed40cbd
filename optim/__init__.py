"""Optimizers for ALBEF training: the original's `create_optimizer` name table on top of torch and timm.

Public API:
* `create_optimizer(args, model, filter_bias_and_bn=True)`: build from the YAML `optimizer:` block.
* `optimizer_needs_create_graph(optimizer)`: True for AdaHessian (the engine then calls
  `backward(create_graph=True)`).
* `param_groups_weight_decay(model, weight_decay, skip)`: the original's no-decay / decay split.
* `NovoGrad`: the original's NovoGrad, the only optimizer written by hand here (see optim_factory).
* `consolidate_optimizer_state(optimizer)`: before a checkpoint, gather a ZeRO-sharded optimizer's state on rank 0
  (`create_optimizer(..., zero=True)`, see optim.zero); a no-op for other optimizers.
"""
from optim.optim_factory import (OPTIMIZER_NAMES, NovoGrad, create_optimizer, optimizer_needs_create_graph,
                                 param_groups_weight_decay)
from optim.schema import OPTIMIZER_KEYS, OPTIMIZER_SCHEMA  # declares the config block to utils.config
from optim.zero import ZeroRedundancyOptimizer, consolidate_optimizer_state

__all__ = ['create_optimizer', 'optimizer_needs_create_graph', 'param_groups_weight_decay', 'NovoGrad',
           'OPTIMIZER_NAMES', 'OPTIMIZER_SCHEMA', 'OPTIMIZER_KEYS', 'consolidate_optimizer_state',
           'ZeroRedundancyOptimizer']
