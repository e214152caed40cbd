"""Momentum-distillation machinery shared by the ALBEF variants.

* `copy_params` / `momentum_update`: online -> momentum copies of (module, module_m) pairs.
* `concat_all_gather`: all-gather along dim 0 without gradient; the identity at world size 1 or without an
  initialised process group (the original crashed there).
* `dequeue_and_enqueue`: ring-buffer write of new columns into feature queues. Any batch size is accepted:
  writes wrap around the end of the queue (the original asserted queue_size % batch == 0).
* `MomentumMixin`: gives a model `copy_params()` and `_momentum_update()` over its `model_pairs`.
"""
import torch
import torch.distributed as dist


@torch.no_grad()
def copy_params(model_pairs):
    """Copy online parameters into the momentum copies and freeze the copies.

    Parameters are walked in `parameters()` order, where tied/shared parameters appear once, so the shared
    structure of both modules must be the same (it is: both are built by the same code).
    """
    for model, model_m in model_pairs:
        for param, param_m in zip(model.parameters(), model_m.parameters()):
            param_m.data.copy_(param.data)
            param_m.requires_grad = False


@torch.no_grad()
def momentum_update(model_pairs, momentum):
    """EMA update param_m <- m * param_m + (1 - m) * param for every pair (buffers untouched)."""
    for model, model_m in model_pairs:
        params = [p.data for p in model.parameters()]
        params_m = [p.data for p in model_m.parameters()]
        if not params_m:
            continue
        # Foreach kernels: one fused update per pair instead of one tiny kernel per tensor.
        torch._foreach_mul_(params_m, momentum)
        torch._foreach_add_(params_m, params, alpha=1. - momentum)


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from all ranks along dim 0 (rank order), without gradient.

    Returns the tensor itself (detached) when torch.distributed is unavailable, uninitialised or has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def dequeue_and_enqueue(queues, queue_ptr, new_items):
    """Write new items into column ring buffers and advance the shared pointer.

    queues: list of buffers [D_i, Q] (a 1-D idx queue is stored as [1, Q]); new_items: list of tensors [n, D_i]
    or [n] (one per queue, rows become columns). The write starts at queue_ptr[0] and wraps around; if n > Q only
    the last Q items are kept. queue_ptr [1] int64 becomes (ptr + n) mod Q.
    """
    Q = queues[0].shape[1]
    ptr = int(queue_ptr[0])
    n = new_items[0].shape[0]
    keep = min(n, Q)
    start = (ptr + n - keep) % Q
    positions = (torch.arange(keep, device=queues[0].device) + start) % Q
    for queue, items in zip(queues, new_items):
        items = items[n - keep:]
        cols = items.reshape(keep, -1).t().to(dtype=queue.dtype, device=queue.device)
        if start + keep <= Q:
            queue[:, start:start + keep] = cols  # contiguous slice: the usual case
        else:
            queue[:, positions] = cols
    queue_ptr[0] = (ptr + n) % Q


class MomentumMixin:
    """Adds copy_params() and _momentum_update() for models holding `model_pairs` and `momentum`."""

    def copy_params(self):
        """Copy online weights into the momentum copies (call after loading pretrained weights)."""
        copy_params(self.model_pairs)

    def _momentum_update(self):
        momentum_update(self.model_pairs, self.momentum)
