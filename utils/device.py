"""Where and how computation runs: the device, autocast precision, deterministic kernels, seeding."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from utils.errors import UserError


def resolve_device(requested: str) -> torch.device:
    """The device to run on: `requested`, falling back to CPU (with a note) when CUDA is absent."""
    if requested.startswith('cuda') and not torch.cuda.is_available():
        print(f'note: --device {requested} requested but CUDA is not available; using cpu')
        return torch.device('cpu')
    return torch.device(requested)


def use_deterministic_algorithms() -> None:
    """Make torch pick deterministic kernels (an error for ops that have none) and stop cuDNN autotuning.

    On CPU with a fixed thread count training is already reproducible; this also covers the CUDA kernels that
    are not (scatter/index_add with atomics, cuBLAS workspaces), at some cost in speed.
    """
    # cuBLAS reads this when its first handle is created, i.e. later than here; a value set by the user wins.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (callers pass seed + rank, as the original does)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)



def autocast(device: torch.device, precision: str, allow_cpu_fp16: bool = False):
    """The autocast context for `precision` (fp32: none). fp16 is refused on CPU, where it has no fast kernels;
    `allow_cpu_fp16` lifts that for tests and the benchmarks' tiny mode (slow, but the same arithmetic paths)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision == 'fp16' and device.type != 'cuda' and not allow_cpu_fp16:
        raise UserError('--precision fp16 needs a CUDA device (it is unusably slow on CPU); use bf16')
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
