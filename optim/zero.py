"""ZeRO-1: the optimizer state sharded across data-parallel ranks (torch's ZeroRedundancyOptimizer).

Each rank keeps the optimizer state (AdamW: two fp32 moments) of about 1/world_size of the parameters and steps
only those; the updated parameters are then broadcast from their owners, so every rank ends the step with the same
weights as plain DDP would. With one process, or without torch.distributed, sharding has nothing to save and the
plain optimizer is used. Checkpoints hold the whole state, gathered on rank 0 (`consolidate_optimizer_state`), in
the plain optimizer's format: a ZeRO run resumes on any number of ranks, with or without ZeRO.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

__all__ = ['zero_sharded', 'consolidate_optimizer_state', 'ZeroRedundancyOptimizer']


def zero_sharded(cls: type, params: list, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer | None:
    """A ZeroRedundancyOptimizer stepping shards of `params` (tensors or the factory's weight-decay groups) with
    `cls(**kwargs)`; None when there is only one rank (the caller then builds the plain optimizer)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)


def consolidate_optimizer_state(optimizer: Any) -> None:
    """Gather a ZeroRedundancyOptimizer's shards on rank 0, so that rank 0's `state_dict()` is complete; every rank
    must call it (a collective). Other optimizers: nothing to do."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
