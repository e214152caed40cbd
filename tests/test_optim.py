"""Optimizer factory: every name trains, the original's parameter grouping, kwargs, kernels, NovoGrad, errors."""
import argparse
import copy
import math

import pytest
import torch
from torch import nn

from optim import OPTIMIZER_NAMES, NovoGrad, create_optimizer, optimizer_needs_create_graph
from utils import AttrDict, ConfigError

# learning rates that make each optimizer move noticeably in 20 steps on the toy problem below
LR = {'sgd': 0.05, 'nesterov': 0.05, 'momentum': 0.05, 'fusedsgd': 0.05, 'fusedmomentum': 0.05, 'sgdp': 0.05,
      'adadelta': 1.0, 'adahessian': 0.1, 'novograd': 0.05, 'nvnovograd': 0.05, 'rmsprop': 0.01,
      'rmsproptf': 0.01, 'adafactor': 0.05, 'fusedlamb': 0.05}


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.5
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, x, y


def _train(optimizer, model, x, y, steps=20):
    create_graph = optimizer_needs_create_graph(optimizer)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward(create_graph=create_graph)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = ((model(x) - y) ** 2).mean().item()
    return losses[0], final


@pytest.mark.filterwarnings('ignore::UserWarning')  # AdaHessian's backward(create_graph=True) warning
@pytest.mark.parametrize('name', list(OPTIMIZER_NAMES) + ['adamW', 'lookahead_adamw', 'lookahead_radam',
                                                         'LOOKAHEAD_SGD', 'lookahead_adahessian'])
def test_each_optimizer_reduces_loss(name):
    model, x, y = _regression()
    base = name.lower().split('_')[-1]
    optimizer = create_optimizer(AttrDict(opt=name, lr=LR.get(base, 0.01), weight_decay=0.01), model)
    first, final = _train(optimizer, model, x, y)
    assert math.isfinite(final)
    assert final < 0.9 * first, (name, first, final)


def test_classes_and_original_settings():
    model = nn.Linear(4, 2)

    def build(**kw):
        return create_optimizer({'lr': 0.1, **kw}, model)

    assert type(build(opt='adamW')) is torch.optim.AdamW
    assert type(build(opt='adam')) is torch.optim.Adam
    assert type(build(opt='adadelta')) is torch.optim.Adadelta
    sgd = build(opt='sgd')
    assert type(sgd) is torch.optim.SGD and sgd.defaults['nesterov'] and sgd.defaults['momentum'] == 0.9
    assert build(opt='nesterov').defaults['nesterov']
    mom = build(opt='momentum', momentum=0.5)
    assert not mom.defaults['nesterov'] and mom.defaults['momentum'] == 0.5
    assert build(opt='rmsprop').defaults['alpha'] == 0.9
    assert build(opt='rmsproptf').defaults['alpha'] == 0.9
    adamp = build(opt='adamp')
    assert type(adamp).__name__ == 'AdamP' and adamp.defaults['wd_ratio'] == 0.01 and adamp.defaults['nesterov']
    assert type(build(opt='sgdp')).__name__ == 'SGDP'
    assert type(build(opt='nadam')).__name__ == 'NAdamLegacy'
    assert type(build(opt='radam')).__name__ == 'RAdamLegacy'
    assert type(build(opt='novograd')) is NovoGrad
    assert type(build(opt='nvnovograd')).__name__ == 'NvNovoGrad'
    assert type(build(opt='fusedlamb')).__name__ == 'Lamb'
    assert type(build(opt='fusedadamw')) is torch.optim.AdamW
    la = build(opt='lookahead_adam')
    assert type(la).__name__ == 'Lookahead' and type(la._base_optimizer) is torch.optim.Adam
    # Adafactor: lr 0 / missing means its relative step size (the original's `if not args.lr`)
    assert create_optimizer({'opt': 'adafactor', 'lr': 0}, model).defaults['lr'] is None
    assert create_optimizer({'opt': 'adafactor'}, model).defaults['lr'] is None
    assert create_optimizer({'opt': 'adafactor', 'lr': 0.01}, model).defaults['lr'] == 0.01


def test_optional_kwargs_and_arg_styles():
    model = nn.Linear(4, 2)
    opt = create_optimizer(AttrDict(opt='adamw', lr=1e-3, weight_decay=0.05, opt_eps=1e-6, opt_betas=[0.8, 0.9],
                                    opt_args={'amsgrad': True}), model)
    assert opt.defaults['eps'] == 1e-6 and opt.defaults['betas'] == (0.8, 0.9) and opt.defaults['amsgrad']
    ns = argparse.Namespace(opt='sgd', lr=0.1, weight_decay=0.0, momentum=0.7, opt_eps=1e-3)
    sgd = create_optimizer(ns, model)  # eps is dropped for SGD-type optimizers, as in the original
    assert sgd.defaults['momentum'] == 0.7 and 'eps' not in sgd.defaults
    assert create_optimizer({'opt': 'adamw', 'lr': '1e-4'}, model).defaults['lr'] == 1e-4


class _Tiny(nn.Module):
    """Parameters of every kind ALBEF has: 0-dim temp, pos_embed/cls_token, norms, biases, matrices, a tied
    (shared) weight, and a frozen momentum copy."""

    def __init__(self, skip=None):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight  # tied, like the MLM decoder
        self.proj_m = nn.Linear(4, 4)
        for p in self.proj_m.parameters():
            p.requires_grad_(False)
        self._skip = skip

    def forward(self, ids):
        h = self.norm(self.embed(ids) + self.pos_embed[:, :ids.shape[1]] + self.cls_token)
        return self.head(self.proj(h)).mean() / self.temp


def _ids(group):
    return {id(p) for p in group['params']}


def test_grouping_is_the_original():
    model = _Tiny()
    opt = create_optimizer(AttrDict(opt='adamW', lr=1e-4, weight_decay=0.02), model)
    no_decay, decay = opt.param_groups
    assert no_decay['weight_decay'] == 0. and decay['weight_decay'] == 0.02
    assert opt.defaults['weight_decay'] == 0.
    assert _ids(no_decay) == {id(model.norm.weight), id(model.norm.bias), id(model.proj.bias), id(model.head.bias)}
    # 0-dim temp, pos_embed, cls_token, embeddings (shared with the head) and matrices ARE decayed, as in the original
    assert _ids(decay) == {id(model.temp), id(model.pos_embed), id(model.cls_token), id(model.embed.weight),
                           id(model.proj.weight)}
    assert len(decay['params']) == 5  # the tied weight appears once
    frozen = {id(p) for p in model.proj_m.parameters()}
    assert not frozen & (_ids(no_decay) | _ids(decay))


def test_grouping_skip_list_and_no_filter():
    class WithSkip(_Tiny):
        def no_weight_decay(self):
            return {'pos_embed', 'cls_token', 'temp'}
    model = WithSkip()
    no_decay, decay = create_optimizer({'opt': 'adamw', 'lr': 1e-4, 'weight_decay': 0.02}, model).param_groups
    assert {id(model.temp), id(model.pos_embed), id(model.cls_token)} <= _ids(no_decay)
    assert _ids(decay) == {id(model.embed.weight), id(model.proj.weight)}
    # no weight decay, or filtering off: one group with all parameters (frozen ones too, as the original)
    for kw in ({'weight_decay': 0.}, {'weight_decay': 0.02}):
        opt = create_optimizer(dict(opt='adamw', lr=1e-4, **kw), model, filter_bias_and_bn=kw['weight_decay'] == 0.)
        assert len(opt.param_groups) == 1
        assert len(opt.param_groups[0]['params']) == len(list(model.parameters()))
        assert opt.param_groups[0]['weight_decay'] == kw['weight_decay']


@pytest.mark.parametrize('name', ['adamw', 'adam', 'sgd', 'nesterov'])
def test_cpu_uses_fused_kernels_that_match_the_loop(name):
    model, x, y = _regression()
    args = {'opt': name, 'lr': 1e-2, 'weight_decay': 0.02}
    opt = create_optimizer(args, model)
    assert opt.defaults.get('fused') is True
    model2, _, _ = _regression()
    ref = create_optimizer({**args, 'opt_args': {'foreach': False}}, model2)
    assert ref.defaults['foreach'] is False and not ref.defaults.get('fused')
    _train(opt, model, x, y, steps=5)
    _train(ref, model2, x, y, steps=5)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_without_a_fused_kernel_uses_the_per_tensor_loop():
    model, _, _ = _regression()
    opt = create_optimizer({'opt': 'rmsprop', 'lr': 1e-2}, model)
    assert type(opt) is torch.optim.RMSprop
    assert opt.defaults['foreach'] is False and not opt.defaults.get('fused')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_uses_fused_adamw():
    model, x, y = _regression()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    opt = create_optimizer({'opt': 'adamW', 'lr': 1e-2, 'weight_decay': 0.02}, model)
    assert opt.defaults.get('fused') is True
    first, final = _train(opt, model, x, y)
    assert final < 0.9 * first


def _novograd_reference(p0, grads, lr, betas, eps, wd, grad_averaging=False):
    """NovoGrad of the original, step by step, on one tensor (float64)."""
    b1, b2 = betas
    p = p0.clone().double()
    g0 = grads[0].double()
    v = (g0 ** 2).sum()
    m = g0 / (v.sqrt() + eps) + wd * p
    ema = None
    for step, g in enumerate(grads, start=1):
        g = g.double()
        g2 = (g ** 2).sum()
        ema = g2 if ema is None else ema * b2 + g2 * (1 - b2)
        h = g / (ema.sqrt() + eps)
        if grad_averaging:
            h = h * (1 - b1)
        v = b2 * v + (1 - b2) * (h ** 2).sum()
        m = b1 * m + (h / (v.sqrt() + eps) + wd * p)
        p = p - lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step) * m
    return p


@pytest.mark.parametrize('grad_averaging', [False, True])
def test_novograd_matches_the_original_formulas(grad_averaging):
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(6)]
    p = nn.Parameter(p0.clone())
    opt = NovoGrad([{'params': [p], 'weight_decay': 0.1}], lr=0.05, betas=(0.9, 0.98), eps=1e-8,
                   grad_averaging=grad_averaging)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(p.grad, grad)  # the gradient is not modified in place
    expected = _novograd_reference(p0, grads, 0.05, (0.9, 0.98), 1e-8, 0.1, grad_averaging)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_novograd_resume_and_late_parameters():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2, 2))
    opt = NovoGrad([a, b], lr=0.1)
    a.grad = torch.ones(4)
    opt.step()  # b has no gradient yet: it is initialised when it gets one (the original raised KeyError)
    a.grad, b.grad = torch.ones(4), torch.ones(2, 2)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint round trip would
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = NovoGrad([a2, b2], lr=0.1)
    opt2.load_state_dict(state)
    for o, (pa, pb) in ((opt, (a, b)), (opt2, (a2, b2))):
        pa.grad, pb.grad = torch.full((4,), 0.5), torch.full((2, 2), -0.5)
        o.step()
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)


def test_needs_create_graph():
    model = nn.Linear(3, 1)
    assert optimizer_needs_create_graph(create_optimizer({'opt': 'adahessian', 'lr': 0.1}, model))
    assert optimizer_needs_create_graph(create_optimizer({'opt': 'lookahead_adahessian', 'lr': 0.1}, model))
    assert not optimizer_needs_create_graph(create_optimizer({'opt': 'adamw', 'lr': 0.1}, model))
    assert not optimizer_needs_create_graph(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize('args, pattern', [
    ({'opt': 'adamx', 'lr': 0.1}, r"unknown opt 'adamx' \(did you mean 'adam'\?\)"),
    ({'opt': 'foo_adamw', 'lr': 0.1}, r"unknown opt 'foo_adamw'.*lookahead_"),
    ({'opt': 'fusednovograd', 'lr': 0.1}, r"'fusednovograd' is not supported: apex"),
    ({'opt': 'adamw'}, r"'lr' is missing"),
    ({'lr': 0.1}, r"'opt' must be an optimizer name"),
    ({'opt': 'adamw', 'lr': 'fast'}, r"'lr' / 'weight_decay' must be numbers"),
    ({'opt': 'adamw', 'lr': 0.1, 'opt_args': [1]}, r"'opt_args' must be a mapping"),
    ({'opt': 'adamw', 'lr': 0.1, 'opt_args': {'nonsense': 1}}, r"bad arguments for 'adamw'"),
])
def test_errors_name_the_culprit(args, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        create_optimizer(args, nn.Linear(2, 2))
    assert '\n' not in str(e.value)
