"""torch.compile for training (config `compile: true`, flag --compile): the encoders are compiled in place.

Only the encoders, the bulk of the FLOPs: the losses, the MLM masking, the hard-negative sampling and the queues
around them stay eager (data-dependent shapes and RNG draws that would split a whole-model graph into many
pieces). `nn.Module.compile()` keeps the module objects and their state-dict keys, so checkpoints of a compiled
run are those of an eager one. The momentum encoders are compiled too: they run under no_grad with parameters the
momentum update rewrites in place, which a compiled module reads at every call (parameters are graph inputs, not
constants); tests/test_gpu_training.py checks the losses and momentum weights against eager.
"""
from __future__ import annotations

import torch

#: Compiled when present: the online encoders and their momentum copies.
COMPILED_ENCODERS = ('visual_encoder', 'text_encoder', 'visual_encoder_m', 'text_encoder_m')


def compile_encoders(model: torch.nn.Module, backend: str = 'inductor', momentum: bool = True) -> list[str]:
    """Compile `model`'s encoders in place (`momentum`: also the momentum copies); returns the names compiled.
    The first steps take the compile time (minutes at full size on CPU; recompiles per input shape)."""
    names = [n for n in COMPILED_ENCODERS if hasattr(model, n) and (momentum or not n.endswith('_m'))]
    for name in names:
        getattr(model, name).compile(backend=backend)
    return names
