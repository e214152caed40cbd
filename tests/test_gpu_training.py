"""Training features meant for GPUs, tested on CPU: fp16 loss scaling (skipped steps, scaler state, exact resume),
the plateau schedule through the engine, ZeRO-1 on 2 gloo ranks (exact kill-and-resume, checkpoints a plain run
loads), torch.compile of the encoders against eager, and benchmarks/gpu_check.py --tiny.

CPU fp16 autocast is slow, not absent: the engine's test-only `allow_cpu_fp16` runs the scaler's code paths on a
tiny model (users still get the one-line refusal, tests/test_engine.py). Compilation uses torch's `aot_eager`
backend here (graph capture and AOT autograd as in a real compile, without the minutes of C++ code generation
inductor needs on CPU); benchmarks/gpu_check.py compares inductor against eager on the GPU.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import engine
import Pretrain
import utils
from dataset.resumable import build_train_loader
from tests.toy import MINI_WORLD_SIZES, ROOT, TINY, generate_world, launch_ranks, mini_config

CPU = torch.device('cpu')


# ----------------------------------------------------------------------------------------------------------------
# A tiny regression run driven through engine.fit
# ----------------------------------------------------------------------------------------------------------------
class Points(Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(4), self.y[i]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.out = nn.Linear(16, 1)
        self.drop = nn.Dropout(0.1)  # uses the torch RNG, which a resume must restore

    def forward(self, x, y):
        pred = self.out(self.drop(torch.relu(self.lin(x)))).squeeze(1).float()
        return {'loss_mse': ((pred - y) ** 2).mean(), 'loss_l1': 0.1 * (pred - y).abs().mean()}


def config(sched=None):
    return {'optimizer': {'opt': 'adamW', 'lr': 0.01, 'weight_decay': 0.01},
            'schedular': sched or {'sched': 'cosine', 'epochs': 3, 'min_lr': 0.001, 'warmup_lr': 0.005,
                                   'warmup_epochs': 1}}


def make_run(cfg):
    utils.seed_everything(0)
    model = Tiny()
    optimizer, scheduler, epochs = engine.build_optimizer_and_scheduler(cfg, model)
    loader = build_train_loader(Points(), batch_size=4, num_workers=0, seed=0)
    return model, optimizer, scheduler, epochs, loader


def inf_grads_at(model, steps):
    """Make the gradients of `model.lin.weight` infinite at the given (1-based) backward calls."""
    calls = {'n': 0}

    def hook(grad):
        calls['n'] += 1
        return grad * float('inf') if calls['n'] in steps else grad
    model.lin.weight.register_hook(hook)


def run_fit(run, cfg, out, precision='fp16', state=None, scaler=None, step=None, **loop):
    model, opt, sched, epochs, loader = run
    return engine.fit(model=model, model_without_ddp=model, train_loader=loader, optimizer=opt, scheduler=sched,
                      step_fn=step or (lambda m, b, a: m(*b)), config=cfg,
                      engine_cfg=engine.EngineConfig(print_freq=1000, warmup_steps=cfg['schedular'].get(
                          'warmup_epochs', 0), precision=precision, allow_cpu_fp16=True, **loop),
                      device=CPU, output_dir=str(out), num_epochs=epochs, state=state, scaler=scaler)


def small_scaler():
    """torch's scaler with a start scale of 2**8 instead of 2**16: the tiny model's fp16 gradients times 2**16
    overflow in its first steps (the scaler then backs off on its own), which would blur the injected skips."""
    return torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


def test_fp16_scaler_skips_steps_with_inf_gradients_and_logs_them(tmp_path):
    cfg = config()
    run = make_run(cfg)
    model = run[0]
    inf_grads_at(model, {3, 12})  # epoch 0 step 2, epoch 1 step 3 (8 steps an epoch)
    weights = []
    orig_step = run[1].step

    def recording_step(*a, **k):
        weights.append(model.lin.weight.detach().clone())
        return orig_step(*a, **k)
    run[1].step = recording_step
    run_fit(run, cfg, tmp_path, scaler=small_scaler())
    lines = log_lines(tmp_path)
    assert [r['train_skipped_steps'] for r in lines] == [1, 1, 0]
    assert all(abs(r['train_loss'] - r['train_loss_mse'] - r['train_loss_l1']) < 1e-6 for r in lines)
    # The skipped steps (the 3rd and 12th) leave the weights as they were, every other step changes them. (With the
    # fused AdamW the scaler still calls optimizer.step and the kernel skips the update itself.)
    unchanged = [i for i in range(1, len(weights)) if torch.equal(weights[i], weights[i - 1])]
    assert unchanged == [3, 12]
    ckpt = torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)
    assert ckpt['scaler']['scale'] == 2.0 ** 8 / 4  # halved twice; 2000 clean steps would double it
    assert ckpt['scaler']['_growth_tracker'] == 12  # clean steps since the last skip
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a half model


def test_fp32_and_bf16_steps_have_no_scaler(tmp_path):
    for precision in ('fp32', 'bf16'):
        assert engine.grad_scaler(CPU, precision) is None
        cfg = config()
        run = make_run(cfg)
        run_fit(run, cfg, tmp_path / precision, precision=precision)
        ckpt = torch.load(tmp_path / precision / 'checkpoint_last.pth', weights_only=True)
        assert 'scaler' not in ckpt and 'skipped_steps' not in ckpt['train_state']
        assert all('train_skipped_steps' not in r for r in log_lines(tmp_path / precision))


class Crash(Exception):
    pass


def crashing_step(at):
    calls = {'n': 0}

    def step(m, batch, alpha):
        calls['n'] += 1
        if calls['n'] == at:
            raise Crash()
        return m(*batch)
    return step


@pytest.mark.parametrize('crash_at', [6, 15])
def test_fp16_resume_after_a_kill_is_exact(tmp_path, crash_at):
    cfg = config()
    run = make_run(cfg)
    inf_grads_at(run[0], {3, 12})
    run_fit(run, cfg, tmp_path / 'ref', scaler=small_scaler())
    reference = torch.load(tmp_path / 'ref' / 'checkpoint_last.pth', weights_only=True)

    run = make_run(cfg)
    inf_grads_at(run[0], {3, 12})
    with pytest.raises(Crash):
        run_fit(run, cfg, tmp_path / 'run', step=crashing_step(crash_at), save_every_steps=2,
                scaler=small_scaler())
    # a new process: fresh objects, another global RNG state; the scaler's scale must come from the checkpoint
    run = make_run(cfg)
    torch.manual_seed(1234)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint_last.pth', weights_only=True)
    done = ckpt['train_state']['global_step']
    inf_grads_at(run[0], {s - done for s in (3, 12) if s > done})
    scaler = engine.grad_scaler(CPU, 'fp16')
    state = engine.restore_training(ckpt, *run[:3], scaler=scaler)
    assert scaler.get_scale() == ckpt['scaler']['scale']
    run_fit(run, cfg, tmp_path / 'run', state=state, scaler=scaler, save_every_steps=2)
    final = torch.load(tmp_path / 'run' / 'checkpoint_last.pth', weights_only=True)
    for k, v in reference['model'].items():
        assert torch.equal(v, final['model'][k]), k
    assert final['scaler'] == reference['scaler']
    assert log_lines(tmp_path / 'run')[-1]['train_skipped_steps'] == log_lines(tmp_path / 'ref')[-1][
        'train_skipped_steps']


def test_checkpoint_without_scaler_state_still_resumes_in_fp16(tmp_path):
    cfg = config()
    run = make_run(cfg)
    run_fit(run, cfg, tmp_path, precision='fp32')
    ckpt = torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)
    scaler = engine.grad_scaler(CPU, 'fp16')
    engine.restore_training(ckpt, *make_run(cfg)[:3], scaler=scaler)
    assert scaler.state_dict()['scale'] == 2.0 ** 16  # fresh
    ckpt['scaler'] = {'scale': 'big'}
    with pytest.raises(engine.TrainingError, match="entry 'scaler' must be a dict of numbers"):
        engine.restore_training(ckpt, *make_run(cfg)[:3], scaler=scaler)


# ----------------------------------------------------------------------------------------------------------------
# Plateau schedule through the engine
# ----------------------------------------------------------------------------------------------------------------
PLATEAU = {'sched': 'plateau', 'epochs': 4, 'decay_rate': 0.5, 'patience_epochs': 0, 'warmup_epochs': 0}


def test_plateau_without_warmup_follows_the_training_loss(tmp_path, monkeypatch):
    from scheduler import PlateauLRScheduler
    cfg = config(dict(PLATEAU))
    run = make_run(cfg)
    sched = run[2]
    steps = []
    orig = PlateauLRScheduler.step
    monkeypatch.setattr(PlateauLRScheduler, 'step',
                        lambda self, epoch, metric=None: (steps.append((epoch, metric)), orig(self, epoch, metric)))
    run_fit(run, cfg, tmp_path, precision='fp32')
    lines = log_lines(tmp_path)
    assert sched.lr_scheduler.mode == 'min'
    # no warm-up call in epoch 0; each later epoch steps with the previous epoch's train_loss
    assert steps == [(e, pytest.approx(lines[e - 1]['train_loss'])) for e in (1, 2, 3)]
    lr, best = 0.01, lines[0]['train_loss']
    for e in (1, 2, 3):
        worse = lines[e - 1]['train_loss'] >= best * (1 - 1e-4)
        if e > 1 and worse:
            lr *= 0.5
        best = min(best, lines[e - 1]['train_loss'])
        assert lines[e]['train_lr'] == pytest.approx(lr), e


def test_plateau_names_a_missing_metric_in_one_line(tmp_path):
    cfg = config(dict(PLATEAU, eval_metric='val_r_mean'))
    with pytest.raises(engine.TrainingError) as e:
        run_fit(make_run(cfg), cfg, tmp_path, precision='fp32')
    msg = str(e.value)
    assert '\n' not in msg and "schedular.eval_metric 'val_r_mean' is not among last epoch's metrics" in msg
    assert 'train_loss' in msg


def test_plateau_resume_at_an_epoch_boundary_is_exact(tmp_path):
    cfg = config(dict(PLATEAU))
    run = make_run(cfg)
    run_fit(run, cfg, tmp_path / 'ref', precision='fp32')
    run = make_run(cfg)
    with pytest.raises(Crash):  # the checkpoint is the one of the end of epoch 1 (no step checkpoints)
        run_fit(run, cfg, tmp_path / 'run', precision='fp32', step=crashing_step(20))
    run = make_run(cfg)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint_last.pth', weights_only=True)
    assert ckpt['train_state']['last_record'].keys() == {'train_loss'}
    state = engine.restore_training(ckpt, *run[:3])
    run_fit(run, cfg, tmp_path / 'run', precision='fp32', state=state)
    a = torch.load(tmp_path / 'ref' / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(tmp_path / 'run' / 'checkpoint_last.pth', weights_only=True)
    assert all(torch.equal(v, b['model'][k]) for k, v in a['model'].items())
    assert a['lr_scheduler']['lr_scheduler'] == b['lr_scheduler']['lr_scheduler']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('gpu_training') / 'world'), 3, **MINI_WORLD_SIZES)


def test_plateau_pretraining_on_the_toy_world(world, tmp_path):
    """Pretraining logs no `loss` of its own (three terms): the plateau's default metric is their sum."""
    cfg = mini_config('Pretrain', world, tmp_path / 'c.yaml', queue_size=8,
                      schedular={'sched': 'plateau', 'epochs': 3, 'patience_epochs': 0, 'decay_rate': 0.5})
    out = tmp_path / 'out'
    assert utils.run_cli(Pretrain.main, ['--config', cfg, '--output_dir', str(out), '--device', 'cpu',
                                         '--no-distributed', '--max_steps_per_epoch', '2']) == 0
    lines = log_lines(out)
    assert len(lines) == 3
    for r in lines:
        assert r['train_loss'] == pytest.approx(r['train_loss_ita'] + r['train_loss_itm'] + r['train_loss_mlm'])
    expected = lines[0]['train_lr'] * (0.5 if lines[1]['train_loss'] >= lines[0]['train_loss'] * (1 - 1e-4)
                                       else 1)
    assert lines[2]['train_lr'] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile of the encoders
# ----------------------------------------------------------------------------------------------------------------
def tiny_pretrain_model():
    import models
    from benchmarks.train_step import _Tokenizer
    cfg = dict(TINY, queue_size=16, temp=0.07, momentum=0.995, mlm_probability=0.15, alpha=0.4)
    torch.manual_seed(0)
    model = models.create_model('pretrain', cfg, _Tokenizer(200))
    model.copy_params()
    return model


def three_steps(model, precision):
    from optim import create_optimizer
    opt = create_optimizer({'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.02}, model)
    torch.manual_seed(1)
    out = []
    for _ in range(3):
        image, ids = torch.randn(4, 3, 16, 16), torch.randint(5, 200, (4, 10))
        ids[:, 0] = 2
        with engine.autocast(CPU, precision):
            losses = model(image, ids, torch.ones_like(ids), alpha=0.4)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        out.append({k: v.item() for k, v in losses.items()})
    return out


def test_compiled_encoders_match_eager():
    """Losses of 3 training steps and the weights after them (momentum encoders and queues included), fp32."""
    eager, compiled = tiny_pretrain_model(), tiny_pretrain_model()
    keys = list(compiled.state_dict())
    names = engine.compile_encoders(compiled, backend='aot_eager')
    assert names == ['visual_encoder', 'text_encoder', 'visual_encoder_m', 'text_encoder_m']
    assert list(compiled.state_dict()) == keys  # checkpoints unchanged
    a, b = three_steps(eager, 'fp32'), three_steps(compiled, 'fp32')
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6)
    sa, sb = eager.state_dict(), compiled.state_dict()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point())
    assert worst < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-1 on 2 gloo ranks
# ----------------------------------------------------------------------------------------------------------------
ZERO_SCHED = {'sched': 'cosine', 'epochs': 2, 'min_lr': 1e-5, 'warmup_lr': 1e-4, 'warmup_epochs': 1}
RANK_FLAGS = ['--device', 'cpu', '--seed', '0', '--deterministic', '--save_every_steps', '1']


def finish(procs, timeout=300):
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f'rank {rank}: {err[-3000:]}'
    return outputs


def kill_after(procs, line_start: str, timeout=300):
    """SIGKILL every rank once rank 0 printed a line starting with `line_start` (the run is then inside a step)."""
    deadline = time.time() + timeout
    for line in procs[0].stdout:
        if line.startswith(line_start) or time.time() > deadline:
            break
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()


def test_zero_two_ranks_kill_and_resume_is_bit_identical_and_loads_without_zero(world, tmp_path):
    cfg = mini_config('Pretrain', world, tmp_path / 'c.yaml', queue_size=8, zero=True, print_freq=1,
                      schedular=dict(ZERO_SCHED))
    ddp_cfg = mini_config('Pretrain', world, tmp_path / 'ddp.yaml', queue_size=8, print_freq=1,
                          schedular=dict(ZERO_SCHED))
    ref, run, ddp = tmp_path / 'ref', tmp_path / 'run', tmp_path / 'ddp'
    reference = launch_ranks('Pretrain.py', ['--config', cfg, '--output_dir', ref, *RANK_FLAGS])
    plain_ddp = launch_ranks('Pretrain.py', ['--config', ddp_cfg, '--output_dir', ddp, *RANK_FLAGS])
    interrupted = launch_ranks('Pretrain.py', ['--config', cfg, '--output_dir', run, *RANK_FLAGS])
    kill_after(interrupted, 'Train epoch [1]  [1/')  # 3 steps an epoch: step 4 of 6 checkpointed, step 5 running
    killed_at = torch.load(run / 'checkpoint_last.pth', weights_only=True)['train_state']['global_step']
    assert 0 < killed_at < 6
    (out0, _), _ = finish(reference)
    assert 'zero: optimizer state sharded over 2 ranks; rank 0 steps' in out0
    finish(plain_ddp)
    finish(launch_ranks('Pretrain.py', ['--config', cfg, '--output_dir', run, '--resume', *RANK_FLAGS]))
    a = torch.load(ref / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    assert a['train_state'] == b['train_state']
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
    # the same training as plain DDP: each parameter takes the same AdamW update, on the rank that owns it
    d = torch.load(ddp / 'checkpoint_last.pth', weights_only=True)
    for k, v in a['model'].items():
        assert torch.equal(v, d['model'][k]), k
    # rank 0 gathered every rank's shard: the state of every trained parameter, in the plain optimizer's layout
    n_params = sum(len(g['params']) for g in a['optimizer']['param_groups'])
    assert sorted(a['optimizer']['state']) == list(range(n_params))
    for i, st in a['optimizer']['state'].items():
        for key, t in st.items():
            assert torch.equal(t, b['optimizer']['state'][i][key]), (i, key)
    # a plain single-process run (no zero) resumes from it and trains on
    plain = mini_config('Pretrain', world, tmp_path / 'plain.yaml', queue_size=8, print_freq=1,
                        schedular=dict(ZERO_SCHED, epochs=3))
    assert utils.run_cli(Pretrain.main, ['--config', plain, '--output_dir', str(run), '--resume', '--device', 'cpu',
                                         '--no-distributed', '--max_steps_per_epoch', '1']) == 0
    assert [r['epoch'] for r in log_lines(run)][-1] == 2


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py
# ----------------------------------------------------------------------------------------------------------------
# Runs the script with ruamel and OpenCV made unimportable, as under a plain CUDA image's python3.
NO_RUAMEL = ("import runpy, sys; sys.modules['ruamel'] = None; sys.modules['ruamel.yaml'] = None; "
             "sys.modules['cv2'] = None; "
             "sys.argv = ['gpu_check', '--tiny', '--json']; "
             "runpy.run_module('benchmarks.gpu_check', run_name='__main__', alter_sys=True)")


def test_gpu_check_tiny_runs_every_row_without_ruamel_or_opencv():
    out = subprocess.run([sys.executable, '-c', NO_RUAMEL], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = result['rows']
    assert not [r for r in rows if 'error' in r]
    kinds = [(r['check'], r['precision'], r.get('compiled', False), r.get('grad_checkpointing')) for r in rows]
    assert kinds == [('pretrain step', 'bf16', False, None), ('pretrain step', 'fp16', False, None),
                     ('pretrain step', 'bf16', True, None),
                     ('retrieval fine-tune step', 'bf16', False, False),
                     ('retrieval fine-tune step', 'bf16', False, True),
                     ('vqa fine-tune step', 'bf16', False, False), ('vqa fine-tune step', 'bf16', False, True),
                     ('retrieval evaluation', 'bf16', False, None)]
    assert all(r['samples_s'] > 0 for r in rows)
    eager, fp16, compiled = rows[:3]
    assert eager['tflop_s'] > 0 and fp16['loss_scale_finite'] and fp16['steps_run'] == 3
    assert compiled['loss_rel_diff_vs_eager'] == 0  # the 'eager' backend runs the captured graphs unchanged
    assert rows[-1]['scores_finite'] and rows[-1]['images'] == 8


def test_gpu_check_peak_and_batch_arithmetic():
    from benchmarks import gpu_check
    assert gpu_check.detect_peak_tflops('NVIDIA H100 80GB HBM3') == 989
    assert gpu_check.detect_peak_tflops('NVIDIA H100 PCIe') == 756
    assert gpu_check.detect_peak_tflops('NVIDIA H200') == 989
    assert gpu_check.detect_peak_tflops('Tesla T4') is None
    # 3 GB fixed, 0.5 GB per sample, 1 GB reserve: (24 - 1 - 3) / 0.5 = 40
    assert gpu_check.fits(3.0, 0.5) == {'fits_24gb': 40, 'fits_40gb': 72, 'fits_80gb': 152}


def test_zero_with_one_process_is_the_plain_optimizer_and_refuses_wrappers():
    from optim import create_optimizer
    model = Tiny()
    opt = create_optimizer({'opt': 'adamW', 'lr': 0.01, 'weight_decay': 0.01}, model, zero=True)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2  # the weight-decay groups
    for name in ('lookahead_adamw', 'adahessian'):
        with pytest.raises(utils.ConfigError, match="cannot be sharded with 'zero: true'"):
            create_optimizer({'opt': name, 'lr': 0.01}, model, zero=True)


def test_zero_and_compile_config_keys_and_flag():
    for key in ('zero', 'compile'):
        utils.validate_config({key: True}, 'c.yaml')
        with pytest.raises(utils.ConfigError, match=f"key '{key}'"):
            utils.validate_config({key: 'yes'}, 'c.yaml')
    parser = utils.get_parent_parser('c.yaml', 'out')
    assert parser.parse_args(['--compile']).compile is True and parser.parse_args([]).compile is None


def test_gpu_check_reports_a_failing_section_and_goes_on():
    import argparse
    from benchmarks import gpu_check
    check = gpu_check.Check(argparse.Namespace(tiny=True, peak_tflops=None))

    def oom():
        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail')
    assert gpu_check.guarded(check, 'vqa fine-tune step', oom) is None
    assert check.rows == [{'check': 'vqa fine-tune step',
                           'error': 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB'}]
    assert '| vqa fine-tune step | | | | | | | | | FAILED: RuntimeError: CUDA out of memory.' in gpu_check.table(check)
