"""LR schedulers: closed-form curves, the original's rates for the released configs, exact resume, factory behaviour."""
import copy
import io
import math
import os

import pytest
import torch
from torch import nn

from optim import create_optimizer
from scheduler import (CosineLRScheduler, PlateauLRScheduler, StepLRScheduler, TanhLRScheduler,
                       create_scheduler)
from utils import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = 1e-9


def _optimizer(lr):
    """Two parameter groups (no-decay / decay), as ALBEF's optimizer has."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    return create_optimizer({'opt': 'adamW', 'lr': lr, 'weight_decay': 0.02}, model)


def _lrs(optimizer):
    return [g['lr'] for g in optimizer.param_groups]


def _assert_lr(optimizer, expected, what=''):
    for lr in _lrs(optimizer):
        assert math.isclose(lr, expected, rel_tol=REL, abs_tol=1e-18), (what, lr, expected)


# ---------------------------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------------------------
def cosine_closed(t, b, w, Wt, T, m, d=1.0, limit=1, t_mul=1.0):
    if t < Wt:
        return w + t * (b - w) / Wt
    t = t - Wt
    if t_mul != 1:
        i = math.floor(math.log(1 - t / T * (1 - t_mul), t_mul))
        t_i = t_mul ** i * T
        t_c = t - (1 - t_mul ** i) / (1 - t_mul) * T
    else:
        i, t_i = t // T, T
        t_c = t - i * T
    if limit == 0 or i < limit:
        return m * d ** i + 0.5 * (b * d ** i - m * d ** i) * (1 + math.cos(math.pi * t_c / t_i))
    return m


def tanh_closed(t, b, w, Wt, T, m, d=1.0, limit=1, lb=-6., ub=4.):
    def after(t):
        i, t_c = t // T, t - (t // T) * T
        if limit == 0 or i < limit:
            r = t_c / T
            return m * d ** i + 0.5 * (b * d ** i - m * d ** i) * (1 - math.tanh(lb * (1 - r) + ub * r))
        return m * d ** limit
    if t < Wt:
        return w + t * (after(Wt) - w) / Wt
    return after(t)


def step_closed(t, b, w, Wt, decay_t, d):
    if t < Wt:
        return w + t * (b - w) / Wt
    return b * d ** (t // decay_t)


@pytest.mark.parametrize('kw', [
    dict(b=1e-4, w=1e-5, Wt=20, T=30, m=1e-5),
    dict(b=0.1, w=0.0, Wt=0, T=10, m=0.001),
    dict(b=0.1, w=0.01, Wt=3, T=5, m=0.001, d=0.5, limit=3),
    dict(b=0.1, w=0.01, Wt=2, T=4, m=0.001, d=0.5, limit=0),  # unlimited cycles (original semantics)
    dict(b=0.1, w=0.01, Wt=2, T=4, m=0.002, d=0.7, limit=3, t_mul=2.0),
])
def test_cosine_closed_form(kw):
    opt = _optimizer(kw['b'])
    sched = CosineLRScheduler(opt, t_initial=kw['T'], lr_min=kw['m'], cycle_mul=kw.get('t_mul', 1.0),
                              cycle_decay=kw.get('d', 1.0), cycle_limit=kw.get('limit', 1), warmup_t=kw['Wt'],
                              warmup_lr_init=kw['w'])
    _assert_lr(opt, kw['w'] if kw['Wt'] else kw['b'], 'construction')
    for t in range(0, 60):
        sched.step(t)
        _assert_lr(opt, cosine_closed(t, **kw), t)


@pytest.mark.parametrize('kw', [
    dict(b=0.1, w=0.01, Wt=3, T=10, m=0.001),
    dict(b=0.1, w=0.0, Wt=0, T=6, m=0.001, d=0.5, limit=2),
    dict(b=0.1, w=0.02, Wt=2, T=5, m=0.001, d=0.5, limit=0),
])
def test_tanh_closed_form(kw):
    opt = _optimizer(kw['b'])
    sched, n = create_scheduler({'sched': 'tanh', 'epochs': kw['T'], 'min_lr': kw['m'], 'warmup_lr': kw['w'],
                                 'warmup_epochs': kw['Wt'], 'decay_rate': kw.get('d', 1.0),
                                 'lr_cycle_limit': kw.get('limit', 1), 'cooldown_epochs': 2}, opt)
    assert isinstance(sched, TanhLRScheduler)
    assert n == kw['T'] * max(1, kw.get('limit', 1)) + 2
    for t in range(0, 40):
        sched.step(t)
        _assert_lr(opt, tanh_closed(t, **kw), t)


@pytest.mark.parametrize('Wt, w', [(0, 0.0), (3, 0.01)])
def test_step_closed_form(Wt, w):
    opt = _optimizer(0.1)
    sched, n = create_scheduler({'sched': 'step', 'epochs': 20, 'decay_epochs': 4, 'decay_rate': 0.5,
                                 'warmup_epochs': Wt, 'warmup_lr': w}, opt)
    assert isinstance(sched, StepLRScheduler) and n == 20
    for t in range(0, 25):
        sched.step(t)
        _assert_lr(opt, step_closed(t, 0.1, w, Wt, 4, 0.5), t)


def test_plateau_warmup_and_reductions():
    opt = _optimizer(0.1)
    sched, n = create_scheduler({'sched': 'plateau', 'epochs': 12, 'warmup_epochs': 2, 'warmup_lr': 0.01,
                                 'decay_rate': 0.5, 'patience_epochs': 1, 'min_lr': 0.02,
                                 'eval_metric': 'val_loss'}, opt)
    assert isinstance(sched, PlateauLRScheduler) and n == 12
    _assert_lr(opt, 0.01, 'construction')
    sched.step(0, 5.0)
    _assert_lr(opt, 0.01)
    sched.step(1, 5.0)
    _assert_lr(opt, 0.055)
    sched.step(2, 5.0)
    _assert_lr(opt, 0.1)  # epoch == warmup_epochs: the base lr
    # mode 'min' ('loss' in eval_metric): improvements keep the lr, 2 bad epochs (> patience 1) halve it
    expected = {3: 0.1, 4: 0.1, 5: 0.1, 6: 0.05, 7: 0.05, 8: 0.025, 9: 0.025, 10: 0.02}
    metrics = {3: 1.0, 4: 0.5, 5: 0.6, 6: 0.6, 7: 0.7, 8: 0.7, 9: 0.9, 10: 0.9}
    for e in range(3, 11):
        sched.step(e, metrics[e])
        _assert_lr(opt, expected[e], e)
    with pytest.raises(ValueError, match='metric is required'):
        sched.step(11)


def test_plateau_mode_and_no_warmup():
    opt = _optimizer(0.1)
    sched, _ = create_scheduler({'sched': 'plateau', 'epochs': 5, 'warmup_lr': 0.01, 'patience_epochs': 0,
                                 'decay_rate': 0.1}, opt)
    assert sched.lr_scheduler.mode == 'min'  # the default metric is the training loss
    _assert_lr(opt, 0.1)
    sched.step(0, 0.5)  # the original set warmup_lr here even without warm-up
    _assert_lr(opt, 0.1)
    sched.step(1, 0.6)  # worse in 'min' mode, patience 0: reduce
    _assert_lr(opt, 0.01)
    sched, _ = create_scheduler({'sched': 'plateau', 'epochs': 5, 'eval_metric': 'val_r_mean'}, opt)
    assert sched.lr_scheduler.mode == 'max'


# ---------------------------------------------------------------------------------------------------------------
# The released configs driven as the original's scripts drive them
# ---------------------------------------------------------------------------------------------------------------
TABLE = {
    # config: (warm-up values every 100 iterations incl. the final base lr, {epoch: lr} (printed values))
    'Pretrain': ([1e-5, 1.45e-5, 1.9e-5] + [None] * 16 + [9.55e-5, 1e-4],
                 {0: 1e-4, 1: 9.975e-5, 2: 9.902e-5, 3: 9.780e-5, 4: 9.611e-5, 5: 9.397e-5, 28: 1.098e-5,
                  29: 1.025e-5}),
    'Retrieval_coco': ([1e-5, 1e-5], dict(enumerate([1e-5, 9.141e-6, 6.891e-6, 4.109e-6, 1.859e-6]))),
    'Grounding': ([1e-5, 1e-5], dict(enumerate([1e-5, 9.141e-6, 6.891e-6, 4.109e-6, 1.859e-6]))),
    'Retrieval_flickr': ([1e-5, 1e-5], dict(enumerate([1e-5, 9.780e-6, 9.141e-6, 8.145e-6, 6.891e-6, 5.5e-6,
                                                       4.109e-6, 2.855e-6, 1.859e-6, 1.220e-6]))),
    'VQA': ([1e-5, 1.25e-5, 1.5e-5, 1.75e-5, 2e-5],
            dict(enumerate([2e-5, 1.928e-5, 1.722e-5, 1.414e-5, 1.05e-5, 6.865e-6, 3.782e-6, 1.723e-6]))),
    'NLVR': ([1e-5, 2e-5], dict(enumerate([2e-5, 1.954e-5, 1.819e-5, 1.608e-5, 1.344e-5, 1.05e-5, 7.564e-6,
                                           4.916e-6, 2.814e-6, 1.465e-6]))),
    'VE': ([1e-5, 2e-5], dict(enumerate([2e-5, 1.819e-5, 1.344e-5, 7.564e-6, 2.814e-6]))),
    'NLVR_pretrain': ([1e-5, 2e-5], {0: 2e-5}),
}
START_OF_EPOCH = {'Pretrain', 'VQA', 'NLVR_pretrain'}  # step(epoch + Wt) at the start; others at the end (+1)


def _printed(x):
    return float('%.4g' % x)


@pytest.mark.parametrize('name', sorted(TABLE))
def test_spec_9_3_table(name):
    config = load_config(os.path.join(ROOT, 'configs', f'{name}.yaml'))
    sc = config['schedular']
    b, w, Wt, T, m = config['optimizer']['lr'], sc['warmup_lr'], sc['warmup_epochs'], sc['epochs'], sc['min_lr']
    opt = _optimizer(b)
    sched, num_epochs = create_scheduler(sc, opt)
    assert num_epochs == T
    warm_table, epoch_table = TABLE[name]

    # epoch 0: the lr used at each iteration; after iteration i (i % 100 == 0, i <= 100 Wt) step(i // 100)
    used = []
    for i in range(100 * Wt + 150):
        used.append(_lrs(opt))
        if i % 100 == 0 and i <= 100 * Wt:
            sched.step(i // 100)
    for j, printed in enumerate(warm_table):
        # value j = w + j (b - w) / Wt is set by step(j) after iteration 100 j, so iteration 100 j + 1 runs at it
        # (j = 0: the constructor value, from iteration 0)
        it = 0 if j == 0 else 100 * j + 1
        expected = w + j * (b - w) / Wt
        for lr in used[it]:
            assert math.isclose(lr, expected, rel_tol=REL), (name, 'warm-up', j, lr, expected)
            if printed is not None:
                assert _printed(lr) == printed, (name, 'warm-up', j, lr, printed)
        if j >= 1:  # iteration 100 j itself still runs at the previous value
            for lr in used[100 * j]:
                assert math.isclose(lr, w + (j - 1) * (b - w) / Wt, rel_tol=REL), (name, 'warm-up', j)
    for lr in used[-1]:
        assert math.isclose(lr, b, rel_tol=REL)  # end of warm-up: the base lr (cosine at t' = 0)

    # epochs >= 1, driven both ways; they must agree and match the closed form / the printed table
    for style in ('start', 'end'):
        opt2 = _optimizer(b)
        sched2, _ = create_scheduler(sc, opt2)
        for i in range(0, 100 * Wt + 1, 100):
            sched2.step(i // 100)
        per_epoch = {0: _lrs(opt2)}
        for epoch in range(1, T):
            if style == 'start':
                sched2.step(epoch + Wt)
                per_epoch[epoch] = _lrs(opt2)
            else:
                sched2.step(epoch - 1 + Wt + 1)  # called at the end of epoch - 1
                per_epoch[epoch] = _lrs(opt2)
        for epoch in range(T):
            expected = m + 0.5 * (b - m) * (1 + math.cos(math.pi * epoch / T))
            for lr in per_epoch[epoch]:
                assert math.isclose(lr, expected, rel_tol=REL), (name, style, epoch, lr, expected)
                if epoch in epoch_table:
                    assert _printed(lr) == epoch_table[epoch], (name, style, epoch, lr)


# ---------------------------------------------------------------------------------------------------------------
# timm's cosine scheduler is the original's on every shipped config
# ---------------------------------------------------------------------------------------------------------------
SHIPPED_CONFIGS = sorted(os.path.relpath(os.path.join(d, f), ROOT)
                         for d in (os.path.join(ROOT, 'configs'), os.path.join(ROOT, 'configs', 'toy'))
                         for f in os.listdir(d) if f.endswith('.yaml'))


def original_cosine_lrs(t, base_values, w, Wt, T, m):
    """The original's one-cycle cosine lr at t, in its own order of operations (warm-up steps precomputed)."""
    if t < Wt:
        return [w + t * ((b - w) / Wt) for b in base_values]
    t = t - Wt
    i, t_c = t // T, t - T * (t // T)
    if i >= 1:
        return [m for _ in base_values]
    gamma = 1.0 ** i
    return [m * gamma + 0.5 * (b * gamma - m * gamma) * (1 + math.cos(math.pi * t_c / T)) for b in base_values]


@pytest.mark.parametrize('path', SHIPPED_CONFIGS)
def test_timm_cosine_is_the_original_on_every_shipped_config(path):
    """Step create_scheduler's scheduler, plain timm CosineLRScheduler(warmup_prefix=True) and the original's
    formula over the whole schedule (the warm-up steps, every epoch, past the end): identical lrs."""
    from timm.scheduler import CosineLRScheduler as TimmCosine
    config = load_config(os.path.join(ROOT, path))
    sc = config['schedular']
    assert sc['sched'] == 'cosine' and sc.get('lr_cycle_limit', 1) == 1, path
    b, w, Wt, T, m = config['optimizer']['lr'], sc['warmup_lr'], sc['warmup_epochs'], sc['epochs'], sc['min_lr']
    ours_opt, timm_opt = _optimizer(b), _optimizer(b)
    ours, num_epochs = create_scheduler(sc, ours_opt)
    timm = TimmCosine(timm_opt, t_initial=T, lr_min=m, cycle_decay=sc['decay_rate'], warmup_t=Wt,
                      warmup_lr_init=w, warmup_prefix=True)
    assert num_epochs == T + sc['cooldown_epochs']
    assert _lrs(ours_opt) == _lrs(timm_opt)
    for t in range(Wt + num_epochs + 3):
        ours.step(t)
        timm.step(t)
        assert _lrs(ours_opt) == _lrs(timm_opt) == original_cosine_lrs(t, [b, b], w, Wt, T, m), (path, t)


# ---------------------------------------------------------------------------------------------------------------
# Resume, factory details
# ---------------------------------------------------------------------------------------------------------------
def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the engine's checkpoint reader does


@pytest.mark.parametrize('cfg', [
    {'sched': 'cosine', 'epochs': 10, 'min_lr': 1e-3, 'warmup_lr': 1e-2, 'warmup_epochs': 3},
    {'sched': 'cosine', 'epochs': 10, 'min_lr': 1e-3, 'lr_noise': [0.2, 0.9], 'seed': 7},
    {'sched': 'tanh', 'epochs': 10, 'min_lr': 1e-3, 'warmup_lr': 1e-2, 'warmup_epochs': 2},
    {'sched': 'step', 'epochs': 10, 'decay_epochs': 2, 'decay_rate': 0.5, 'warmup_epochs': 1, 'warmup_lr': 0.01},
    {'sched': 'plateau', 'epochs': 12, 'decay_rate': 0.5, 'patience_epochs': 2, 'warmup_epochs': 1,
     'warmup_lr': 0.01, 'eval_metric': 'loss', 'lr_noise': 0.5},
])
def test_exact_resume(cfg):
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.8, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9]
    opt = _optimizer(0.1)
    sched, _ = create_scheduler(cfg, opt)
    for e in range(5):
        sched.step(e, metrics[e])
    opt_state, sched_state = _roundtrip(opt.state_dict()), _roundtrip(sched.state_dict())
    opt2 = _optimizer(0.1)
    sched2, _ = create_scheduler(cfg, opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert _lrs(opt2) == _lrs(opt)
    for e in range(5, 12):
        sched.step(e, metrics[e])
        sched2.step(e, metrics[e])
        assert _lrs(opt2) == _lrs(opt), (cfg['sched'], e)


def test_plateau_loads_the_original_two_key_state():
    opt = _optimizer(0.1)
    sched, _ = create_scheduler({'sched': 'plateau', 'epochs': 5, 'eval_metric': 'loss'}, opt)
    sched.load_state_dict({'best': 0.25, 'last_epoch': 3})
    assert sched.lr_scheduler.best == 0.25 and sched.lr_scheduler.last_epoch == 3


def test_noise():
    cfg = {'sched': 'cosine', 'epochs': 10, 'min_lr': 1e-3, 'lr_noise': [0.5, 0.8], 'lr_noise_pct': 0.3,
           'seed': 3}
    opt = _optimizer(0.1)
    sched, _ = create_scheduler(cfg, opt)
    assert sched.noise_range_t == [5.0, 8.0]
    for t in range(10):
        sched.step(t)
        clean = cosine_closed(t, 0.1, 0.0, 0, 10, 1e-3)
        lr = _lrs(opt)[0]
        if 5 <= t < 8:
            g = torch.Generator().manual_seed(3 + t)
            while True:
                noise = torch.randn(1, generator=g).item()
                if abs(noise) < 0.3:
                    break
            assert math.isclose(lr, clean * (1 + noise), rel_tol=REL)
            assert lr != clean
        else:
            assert math.isclose(lr, clean, rel_tol=REL)
    single, _ = create_scheduler(dict(cfg, lr_noise=[0.5]), _optimizer(0.1))
    assert single.noise_range_t == 5.0
    scalar, _ = create_scheduler(dict(cfg, lr_noise=0.3), _optimizer(0.1))
    assert scalar.noise_range_t == pytest.approx(3.0)


def test_factory_details():
    opt = _optimizer(0.1)
    sched, n = create_scheduler({'sched': 'Cosine', 'epochs': 8, 'cooldown_epochs': 2, 'warmup_epochs': 3,
                                 'warmup_lr': 0.01, 'lr': 123.0}, opt)  # the block's lr is ignored
    assert isinstance(sched, CosineLRScheduler) and n == 10  # warm-up not counted, as the original
    assert sched.base_values == [0.1, 0.1]
    sched, n = create_scheduler({'sched': 'cosine', 'epochs': 4, 'lr_cycle_limit': 3}, _optimizer(0.1))
    assert n == 12
    # state dict is plain data
    assert all(not isinstance(v, torch.optim.Optimizer) for v in sched.state_dict().values())


@pytest.mark.parametrize('cfg, pattern', [
    ({'sched': 'linear', 'epochs': 3}, r"unknown sched 'linear'"),
    ({'epochs': 3}, r'unknown sched None'),
    ({'sched': 'cosine'}, r"'epochs' is missing"),
    ({'sched': 'cosine', 'epochs': 0}, r"'epochs' must be positive"),
    ({'sched': 'cosine', 'epochs': 3, 'min_lr': 'low'}, r"'min_lr' must be a number"),
    ({'sched': 'step', 'epochs': 3}, r"'decay_epochs' is missing"),
    ({'sched': 'cosine', 'epochs': 3, 'warmup_epochs': -1}, r"'warmup_epochs' must be >= 0"),
])
def test_factory_errors(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        create_scheduler(cfg, _optimizer(0.1))
    assert '\n' not in str(e.value)


def test_constructor_state_with_timm_defaults_overridden():
    """Current timm defaults differ (cosine warmup_prefix False, step warmup_prefix True): ours are the original's."""
    opt = _optimizer(1e-4)
    sched = CosineLRScheduler(opt, t_initial=30, lr_min=1e-5, warmup_t=20, warmup_lr_init=1e-5)
    sched.step(20)
    _assert_lr(opt, 1e-4)  # timm 1.0's default would jump to 3.25e-5 here
    opt = _optimizer(0.1)
    sched = StepLRScheduler(opt, decay_t=2, decay_rate=0.5, warmup_t=2, warmup_lr_init=0.0)
    sched.step(2)
    _assert_lr(opt, 0.05)  # absolute t: 0.1 * 0.5 ** (2 // 2)
    assert copy.deepcopy(sched.state_dict())['warmup_t'] == 2
