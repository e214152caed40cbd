"""Optimizer factory: `create_optimizer(args, model)` with the original ALBEF (timm 0.4) names and semantics.

Built from torch.optim and timm.optim classes. The original's name table is reproduced on top of current timm
(1.0.x), where several names changed meaning:

* 'nadam' / 'radam' build timm's `NAdamLegacy` / `RAdamLegacy`: those are the optimizers the original's
  'nadam' / 'radam' built (current timm maps the names to torch.optim.NAdam / RAdam).
* 'nvnovograd' builds timm's `NvNovoGrad` (current timm no longer knows the name; its 'novograd' *is* NvNovoGrad).
* 'novograd' builds `NovoGrad` below: the original's NovoGrad (Kimura's variant, with its own bias correction and
  double gradient normalisation). No maintained library ships that algorithm any more (torch-optimizer's NovoGrad
  is NVIDIA's variant), so **NovoGrad is the one optimizer written by hand here**.
* 'adafactor' factors the second moment of every >= 2-D parameter whatever its size, as the original did
  (timm 1.0 skips dims <= 16 by default); for > 2-D tensors timm 1.0's choice of the two factored dims applies.
* 'fusedsgd' / 'fusedmomentum' / 'fusedadam' / 'fusedadamw' (apex in the original) build the torch optimizers
  with the same algorithm (torch's own fused kernels are used on CUDA, see below); 'fusedlamb' builds timm's
  `Lamb` (the algorithm of apex FusedLAMB's defaults). 'fusednovograd' (apex FusedNovoGrad, whose bias-corrected
  algorithm nothing else provides) is refused with a ConfigError.

Kernels: torch's fused implementation is chosen when every parameter is a floating-point tensor on one CPU or
CUDA device and the class has one (SGD, Adam, AdamW): on CPU it is 5-9x faster than the other two (AdamW
on 300 768x768 tensors, 2 threads: fused 0.10 s, per-tensor loop 0.52 s, foreach 0.93 s) and makes no temporary
copy of the optimizer state. Otherwise the multi-tensor `foreach` implementation on CUDA, and the per-tensor loop
on CPU, where torch's foreach ops are a slower loop. `opt_args` may override (e.g. `opt_args: {fused: false}`).
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.optim.optimizer import Optimizer

from timm.optim import (SGDP, Adafactor, Adahessian, AdamP, Lamb, Lookahead, NAdamLegacy, NvNovoGrad, RAdamLegacy,
                        RMSpropTF)

from optim.zero import zero_sharded
from utils import ConfigError

__all__ = ['create_optimizer', 'param_groups_weight_decay', 'optimizer_needs_create_graph', 'NovoGrad',
           'OPTIMIZER_NAMES']


# ----------------------------------------------------------------------------------------------------------------
# The hand-written optimizer
# ----------------------------------------------------------------------------------------------------------------
class NovoGrad(Optimizer):
    """NovoGrad as the original ALBEF/timm 0.4 'novograd' (Kimura's implementation of arXiv:1905.11286).

    Written by hand because no maintained library provides this variant. Per parameter tensor, with g its grad:

    * first time the tensor is seen: ``v = |g|^2``, ``m = g / (sqrt(v) + eps) + wd * p``, ``step = 0``;
    * every step: ``step += 1``; ``e = |g|^2`` on the first step else ``beta2 * e + (1 - beta2) * |g|^2``;
      ``h = g / (sqrt(e) + eps)`` (times ``1 - beta1`` with grad_averaging);
      ``v = beta2 * v + (1 - beta2) * |h|^2``; ``m = beta1 * m + h / (sqrt(v) + eps) + wd * p``;
      ``p -= lr * sqrt(1 - beta2^step) / (1 - beta1^step) * m``.

    Deliberate differences from the original code (results are otherwise identical):
    the weight decay is read from each parameter group (the original used the constructor's value for every
    group, so the factory's no-decay/decay grouping, which sets the constructor's value to 0, silently disabled
    weight decay); the state is initialised per parameter on its first gradient (the original initialised
    once, globally, and then failed with KeyError for parameters that got a gradient later, or after
    load_state_dict); `p.grad` is not modified in place.
    """

    def __init__(self, params, grad_averaging: bool = False, lr: float = 0.1, betas=(0.95, 0.98),
                 eps: float = 1e-8, weight_decay: float = 0.):
        if lr < 0.0:
            raise ValueError(f'NovoGrad: invalid learning rate {lr}')
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f'NovoGrad: invalid betas {betas}')
        if eps < 0.0:
            raise ValueError(f'NovoGrad: invalid eps {eps}')
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Performs one optimization step (optionally re-evaluating the loss with `closure`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            eps, wd, lr = group['eps'], group['weight_decay'], group['lr']
            for p in group['params']:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError('NovoGrad does not support sparse gradients')
                state = self.state[p]
                if len(state) == 0:
                    v0 = grad.pow(2).sum()
                    state['step'] = 0
                    state['v'] = v0
                    state['m'] = grad / (v0.sqrt() + eps) + wd * p
                    state['grad_ema'] = torch.zeros_like(v0)
                state['step'] += 1
                step = state['step']
                g2 = grad.pow(2).sum()
                if step == 1:
                    state['grad_ema'].copy_(g2)
                else:
                    state['grad_ema'].mul_(beta2).add_(g2, alpha=1.0 - beta2)
                h = grad / (state['grad_ema'].sqrt() + eps)
                if group['grad_averaging']:
                    h.mul_(1.0 - beta1)
                v = state['v']
                v.mul_(beta2).add_(h.pow(2).sum(), alpha=1.0 - beta2)
                m = state['m']
                m.mul_(beta1).add_(h / (v.sqrt() + eps))
                if wd != 0:
                    m.add_(p, alpha=wd)
                step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
                p.add_(m, alpha=-step_size)
        return loss


# ----------------------------------------------------------------------------------------------------------------
# Name table
# ----------------------------------------------------------------------------------------------------------------
# name -> (class, fixed kwargs, uses args.momentum, accepts eps)
_TABLE: dict[str, tuple[type, dict, bool, bool]] = {
    'sgd': (torch.optim.SGD, {'nesterov': True}, True, False),
    'nesterov': (torch.optim.SGD, {'nesterov': True}, True, False),
    'momentum': (torch.optim.SGD, {'nesterov': False}, True, False),
    'adam': (torch.optim.Adam, {}, False, True),
    'adamw': (torch.optim.AdamW, {}, False, True),
    'nadam': (NAdamLegacy, {}, False, True),
    'radam': (RAdamLegacy, {}, False, True),
    'adamp': (AdamP, {'wd_ratio': 0.01, 'nesterov': True}, False, True),
    'sgdp': (SGDP, {'nesterov': True}, True, True),
    'adadelta': (torch.optim.Adadelta, {}, False, True),
    'adafactor': (Adafactor, {'min_dim_size_to_factor': 0}, False, True),
    'adahessian': (Adahessian, {}, False, True),
    'rmsprop': (torch.optim.RMSprop, {'alpha': 0.9}, True, True),
    'rmsproptf': (RMSpropTF, {'alpha': 0.9}, True, True),
    'novograd': (NovoGrad, {}, False, True),
    'nvnovograd': (NvNovoGrad, {}, False, True),
    'fusedsgd': (torch.optim.SGD, {'nesterov': True}, True, False),
    'fusedmomentum': (torch.optim.SGD, {'nesterov': False}, True, False),
    'fusedadam': (torch.optim.Adam, {}, False, True),
    'fusedadamw': (torch.optim.AdamW, {}, False, True),
    'fusedlamb': (Lamb, {}, False, True),
}
#: Every accepted base name (each may also be given as 'lookahead_<name>'); matching is case-insensitive.
OPTIMIZER_NAMES = tuple(sorted(_TABLE))
_REFUSED = {'fusednovograd': 'apex FusedNovoGrad is not available and no library provides its algorithm; '
                             "use 'nvnovograd' or 'novograd'"}
_FUSED_CAPABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
DEFAULT_MOMENTUM = 0.9  # timm's train.py default; ALBEF configs never set it (they use adamW)


def _get(args: Any, key: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(key, default)
    return getattr(args, key, default)


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """The original's two parameter groups: ``[no-decay (weight_decay 0), decay (weight_decay)]``.

    A trainable parameter goes to the no-decay group when it is 1-D (LayerNorm weights, biases), its name ends
    with '.bias', or its name is in `skip`; everything else, **including 0-dim parameters such as ALBEF's `temp`,
    and `pos_embed` / `cls_token` / embedding tables**, is decayed, exactly as in the original.
    Parameters with requires_grad False (the momentum copies) are left out; shared parameters appear
    once (named_parameters de-duplicates them).
    """
    skip = set(skip)
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith('.bias') or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': weight_decay}]


def _all_params(params: list) -> list[torch.Tensor]:
    out = []
    for p in params:
        if isinstance(p, dict):
            out.extend(p['params'])
        else:
            out.append(p)
    return out


def _kernel_kwargs(cls: type, params: list, opt_args: Mapping) -> dict:
    """Pick the fastest implementation torch offers for these parameters (see the module docstring)."""
    if 'fused' in opt_args or 'foreach' in opt_args:
        return {}  # the user decided
    accepted = inspect.signature(cls.__init__).parameters
    tensors = _all_params(params)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return {}
    device_type = next(iter(devices)).type
    floating = all(t.is_floating_point() for t in tensors)
    if floating and device_type in ('cpu', 'cuda') and cls in _FUSED_CAPABLE and 'fused' in accepted:
        return {'fused': True}
    if 'foreach' in accepted:
        return {'foreach': device_type != 'cpu'}
    return {}


def create_optimizer(args: Any, model: nn.Module, filter_bias_and_bn: bool = True, zero: bool = False) -> Optimizer:
    """Build the optimizer described by the YAML `optimizer:` block (a dict, AttrDict or namespace).

    Keys: `opt` (name, case-insensitive, optionally prefixed 'lookahead_'), `lr`, `weight_decay` (default 0),
    optional `momentum` (SGD-type and RMSprop optimizers; default 0.9), `opt_eps`, `opt_betas`, and `opt_args`
    (a dict merged into the optimizer's keyword arguments last). See the module docstring for the names.

    With a non-zero weight decay and `filter_bias_and_bn`, parameters are split by `param_groups_weight_decay`
    (skip-set: `model.no_weight_decay()` when the passed model defines it) and the optimizer-level weight decay
    becomes 0; otherwise all of `model.parameters()` form one group. Raises utils.ConfigError naming the bad key.

    `zero` (the config's `zero: true`): shard the optimizer state across the ranks of torch.distributed (ZeRO-1,
    see optim.zero), same parameter groups and arguments; a plain optimizer when there is one rank. Lookahead
    (which wraps another optimizer) and second-order optimizers are refused with it.
    """
    opt = _get(args, 'opt')
    if not isinstance(opt, str) or not opt:
        raise ConfigError(f"optimizer: 'opt' must be an optimizer name, got {opt!r}")
    lr = _get(args, 'lr')
    if lr is None and opt.lower().split('_')[-1] != 'adafactor':
        raise ConfigError(f"optimizer: 'lr' is missing (opt={opt!r})")
    try:
        lr = None if lr is None else float(lr)
        weight_decay = float(_get(args, 'weight_decay', 0.) or 0.)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer: 'lr' / 'weight_decay' must be numbers ({e})") from None

    parts = opt.lower().split('_')
    name = parts[-1]
    lookahead = False
    if len(parts) == 2 and parts[0] == 'lookahead':
        lookahead = True
    elif len(parts) != 1:
        raise ConfigError(f"optimizer: unknown opt {opt!r} (the only accepted prefix is 'lookahead_')")
    if name in _REFUSED:
        raise ConfigError(f"optimizer: opt {opt!r} is not supported: {_REFUSED[name]}")
    if name not in _TABLE:
        close = difflib.get_close_matches(name, OPTIMIZER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ''
        raise ConfigError(f"optimizer: unknown opt {opt!r}{hint}; known: {', '.join(OPTIMIZER_NAMES)}")
    cls, fixed, uses_momentum, has_eps = _TABLE[name]

    if weight_decay and filter_bias_and_bn:
        skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
        params: list = param_groups_weight_decay(model, weight_decay, skip)
        weight_decay = 0.
    else:
        params = list(model.parameters())

    # Adafactor with no lr (or lr 0: the original's `if not args.lr`) uses its relative step size.
    kwargs: dict[str, Any] = {'weight_decay': weight_decay, 'lr': (lr or None) if name == 'adafactor' else lr}
    if has_eps and _get(args, 'opt_eps') is not None:
        kwargs['eps'] = float(_get(args, 'opt_eps'))
    if _get(args, 'opt_betas') is not None:
        kwargs['betas'] = tuple(float(b) for b in _get(args, 'opt_betas'))
    if uses_momentum:
        momentum = _get(args, 'momentum')
        kwargs['momentum'] = float(DEFAULT_MOMENTUM if momentum is None else momentum)
    kwargs.update(fixed)
    extra = _get(args, 'opt_args') or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"optimizer: 'opt_args' must be a mapping, got {type(extra).__name__}")
    kwargs.update(extra)
    kwargs.update(_kernel_kwargs(cls, params, kwargs))
    if zero and (lookahead or cls is Adahessian):
        raise ConfigError(f"optimizer: opt {opt!r} cannot be sharded with 'zero: true' (lookahead and second-order "
                          f"optimizers are not supported there)")
    try:
        optimizer = (zero and zero_sharded(cls, params, kwargs)) or cls(params, **kwargs)
    except (TypeError, ValueError) as e:  # unknown keyword, or a value torch refuses (a negative eps, ...)
        raise ConfigError(f"optimizer: bad arguments for {opt!r} ({cls.__name__}): {e}") from None
    if lookahead:
        optimizer = Lookahead(optimizer)
    return optimizer


def optimizer_needs_create_graph(optimizer: Any) -> bool:
    """True when `loss.backward(create_graph=True)` is required before `optimizer.step()` (AdaHessian, also
    under Lookahead): second-order optimizers differentiate the gradients again."""
    return bool(getattr(optimizer, 'is_second_order', False))
