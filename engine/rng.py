"""The random number generators' states (torch, CUDA, numpy, python) in a form that
torch.load(weights_only=True) accepts, checked before they are restored."""
from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import TrainingError


def get_rng_state() -> dict:
    """The states of torch's, numpy's and python's generators (and CUDA's when present), as tensors, ints and
    lists that torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'python': {'version': version, 'state': list(py_state), 'gauss': gauss}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def is_int(x) -> bool:
    """Whether `x` is an int (a bool is not)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """Whether `x` is an int or a float (a bool is not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def rng_state_problem(state) -> str | None:
    """What is wrong with an RNG state as `get_rng_state` writes it (types, keys, sizes), or None when usable."""
    if not isinstance(state, Mapping):
        return f'must be a dict, got {type(state).__name__}'
    for key in ('torch', 'numpy', 'python'):
        if key not in state:
            return f'missing key {key!r}'
    t = state['torch']
    expected = torch.get_rng_state()
    if not torch.is_tensor(t) or t.dtype != torch.uint8 or tuple(t.shape) != tuple(expected.shape):
        what = f'{t.dtype} tensor of shape {tuple(t.shape)}' if torch.is_tensor(t) else type(t).__name__
        return f"'torch' must be a uint8 tensor of shape {tuple(expected.shape)}, got {what}"
    n = state['numpy']
    if not isinstance(n, Mapping) or any(k not in n for k in ('keys', 'pos', 'has_gauss', 'cached_gaussian')):
        return "'numpy' must be a dict with keys, pos, has_gauss and cached_gaussian"
    keys = n['keys']
    if not torch.is_tensor(keys) or keys.dtype != torch.int64 or tuple(keys.shape) != (624,):
        return "'numpy.keys' must be an int64 tensor of 624 values"
    if bool((keys < 0).any()) or bool((keys >= 2 ** 32).any()):
        return "'numpy.keys' holds values outside 0 .. 2**32 - 1"
    if not is_int(n['pos']) or not 0 <= n['pos'] <= 624:
        return f"'numpy.pos' must be an int in 0 .. 624, got {n['pos']!r:.40}"
    if not is_int(n['has_gauss']) or not is_number(n['cached_gaussian']):
        return "'numpy.has_gauss' must be an int and 'numpy.cached_gaussian' a number"
    p = state['python']
    if not isinstance(p, Mapping) or any(k not in p for k in ('version', 'state', 'gauss')):
        return "'python' must be a dict with version, state and gauss"
    ps = p['state']
    if not is_int(p['version']) or not isinstance(ps, (list, tuple)) or len(ps) != 625 \
            or not all(is_int(v) and 0 <= v < 2 ** 32 for v in ps) or ps[-1] > 624:
        return "'python' must hold an int version and a state of 625 ints (random.getstate())"
    if p['gauss'] is not None and not is_number(p['gauss']):
        return f"'python.gauss' must be a number or null, got {p['gauss']!r:.40}"
    cuda = state.get('cuda')
    if cuda is not None and not (isinstance(cuda, (list, tuple))
                                 and all(torch.is_tensor(c) and c.dtype == torch.uint8 for c in cuda)):
        return "'cuda' must be a list of uint8 tensors"
    return None


def gather_rng_states() -> list[dict] | None:
    """Every rank's `get_rng_state()`, in rank order, on every rank (a collective: all ranks call it); None with one
    process. Ranks draw different numbers (seeded seed + rank; ALBEF's MLM masks and ITM negatives use them), so
    an exact multi-rank resume needs each rank's own state back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, get_rng_state())
    return states


def rank_rng_state(checkpoint: Mapping) -> Mapping:
    """The RNG state this rank restores: its own from 'rng_per_rank' when the checkpoint was written by as many
    ranks as run now, else 'rng' (rank 0's; single-process checkpoints have only that)."""
    per_rank = checkpoint.get('rng_per_rank')
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if isinstance(per_rank, (list, tuple)) and len(per_rank) == world > 1:
        return per_rank[dist.get_rank()]
    return checkpoint['rng']


def set_rng_state(state: Mapping) -> None:
    """Restore the states `get_rng_state` saved; TrainingError (before changing anything) for a malformed one.

    CUDA states are restored for the devices present (a checkpoint of an 8-GPU machine also resumes on fewer)."""
    problem = rng_state_problem(state)
    if problem is not None:
        raise TrainingError(f'RNG state: {problem}')
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if state.get('cuda') is not None and torch.cuda.is_available():
        cuda = list(state['cuda'])[:torch.cuda.device_count()]
        for i, c in enumerate(cuda):
            torch.cuda.set_rng_state(c, i)
