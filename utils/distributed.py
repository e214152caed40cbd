"""torch.distributed helpers, all safe without a process group: rank and world size, collectives, start-up.

The names follow the ALBEF / DeiT / MAE lineage (`init_distributed_mode`, `is_main_process`, `get_rank`,
`get_world_size`) so researchers find what they expect.
"""
from __future__ import annotations

import builtins
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    """Whether a process group is running."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """A barrier that is a no-op without a process group."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op at world size 1); returns it for chaining."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list:
    """Gather a picklable object from every rank, in rank order (a one-element list at world size 1)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on non-master ranks unless called with force=True."""
    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args) -> None:
    """Initialise torch.distributed from the environment, or fall back to a single process.

    Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, `torch.distributed.launch --use_env`), the `--local_rank`
    flag (legacy launch without --use_env), or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. `--no-distributed`
    forces a single process. Sets args.distributed, args.rank, args.world_size, args.gpu.
    """
    env = os.environ
    args.rank, args.world_size, args.gpu = 0, 1, 0
    if not getattr(args, 'distributed', True):
        args.distributed = False
        return
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', getattr(args, 'local_rank', 0) or 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
        env.setdefault('MASTER_ADDR', '127.0.0.1')
        env.setdefault('MASTER_PORT', '29500')
    else:
        args.distributed = False
        return
    if args.world_size == 1:
        args.distributed = False
        return
    args.distributed = True
    use_cuda = str(getattr(args, 'device', 'cpu')).startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = 'nccl' if use_cuda else 'gloo'
    timeout = datetime.timedelta(seconds=int(getattr(args, 'dist_timeout', 1800)))
    dist.init_process_group(backend=backend, init_method=getattr(args, 'dist_url', 'env://'),
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    print(f'| distributed init (rank {args.rank} of {args.world_size}, backend {backend})', flush=True)
    dist.barrier()
    setup_for_distributed(args.rank == 0)

