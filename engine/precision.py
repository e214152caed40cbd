"""Mixed precision: the autocast context of a --precision / config `precision` value."""
import contextlib

import torch

import utils


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` (fp32: none). fp16 is refused on CPU, where it has no fast kernels."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision == 'fp16' and device.type != 'cuda':
        raise utils.UserError('--precision fp16 needs a CUDA device (it is unusably slow on CPU); use bf16')
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
