"""Mixed precision in training: the autocast context (one home, `utils.autocast`) and the gradient scaler that fp16
needs (bf16 has fp32's exponent range and needs none)."""
from __future__ import annotations

import torch

from utils.device import autocast  # noqa: F401 (the engine's autocast is utils')


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (torch's defaults: initial scale 2**16, halved on inf/NaN gradients, doubled
    after 2000 clean steps); None for fp32 and bf16, whose steps stay exactly as they were."""
    if precision != 'fp16':
        return None
    return torch.amp.GradScaler(device.type)


def scaled_optimizer_step(scaler: torch.amp.GradScaler, optimizer) -> bool:
    """Unscale the gradients, step unless some gradient is inf/NaN, update the scale; True when the step was
    skipped. Any gradient clipping belongs right after `unscale_`, where the gradients are in true units."""
    scale = scaler.get_scale()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale exactly when this step found inf/NaN gradients (and then skipped the step)
    return scaler.get_scale() < scale
