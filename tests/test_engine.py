"""engine: the shared loop (loss sum, alpha ramp, warm-up stepping, accumulation, non-finite stop), atomic
checkpoints, and exact resume after an interruption at any step."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import engine
import utils
from dataset.resumable import build_train_loader


class NoisyPoints(Dataset):
    """A regression set whose items are randomly 'augmented' with numpy and torch noise."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(4) + float(np.random.randn()) * 0.01, self.y[i]


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)
        self.drop = nn.Dropout(0.2)  # consumes the torch RNG in training, like ALBEF's sampling does
        self.register_buffer('seen', torch.zeros((), dtype=torch.long))

    def forward(self, x, y):
        self.seen += x.size(0)
        pred = self.out(self.drop(torch.relu(self.lin(x)))).squeeze(1)
        return {'loss_mse': ((pred - y) ** 2).mean(), 'loss_l1': 0.1 * (pred - y).abs().mean()}


def step_fn(model, batch, alpha):
    x, y = batch
    return model(x, y)


CONFIG = {'optimizer': {'opt': 'adamW', 'lr': 0.01, 'weight_decay': 0.01},
          'schedular': {'sched': 'cosine', 'lr': 0.01, 'epochs': 3, 'min_lr': 0.001, 'decay_rate': 1,
                        'warmup_lr': 0.005, 'warmup_epochs': 1, 'cooldown_epochs': 0}}


def make_run(seed=0):
    utils.seed_everything(seed)
    model = TinyModel()
    optimizer, scheduler, epochs = engine.build_optimizer_and_scheduler(CONFIG, model)
    loader = build_train_loader(NoisyPoints(), batch_size=4, num_workers=0, seed=seed)
    return model, optimizer, scheduler, epochs, loader


def fit(model, optimizer, scheduler, epochs, loader, out, state=None, step=step_fn, **cfg):
    return engine.fit(model=model, model_without_ddp=model, train_loader=loader, optimizer=optimizer,
                      scheduler=scheduler, step_fn=step, config=CONFIG,
                      engine_cfg=engine.EngineConfig(print_freq=100, warmup_steps=1, **cfg),
                      device=torch.device('cpu'), output_dir=str(out), num_epochs=epochs, state=state)


def test_fit_writes_log_and_checkpoints(tmp_path):
    model, opt, sched, epochs, loader = make_run()
    fit(model, opt, sched, epochs, loader, tmp_path)
    lines = [json.loads(line) for line in open(tmp_path / 'log.txt')]
    assert [r['epoch'] for r in lines] == [0, 1, 2]
    assert {'train_loss_mse', 'train_loss_l1', 'train_lr', 'time_s'} <= set(lines[0])
    assert lines[-1]['train_loss_mse'] < lines[0]['train_loss_mse']  # it learns
    ckpt = torch.load(tmp_path / 'checkpoint_02.pth', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch', 'train_state', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 2 and ckpt['train_state']['epoch'] == 3
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == [
        'checkpoint_00.pth', 'checkpoint_01.pth', 'checkpoint_02.pth', 'checkpoint_last.pth']


@pytest.mark.parametrize('every, kept', [(2, ['checkpoint_01.pth', 'checkpoint_02.pth']), (0, [])])
def test_epoch_checkpoint_every_thins_the_per_epoch_files(tmp_path, every, kept):
    model, opt, sched, epochs, loader = make_run()
    fit(model, opt, sched, epochs, loader, tmp_path, epoch_checkpoint_every=every)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == kept + ['checkpoint_last.pth']
    assert torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)['train_state']['epoch'] == 3


def test_epoch_checkpoint_every_is_read_from_the_config_and_checked():
    assert engine.engine_config({**CONFIG, 'epoch_checkpoint_every': 5}).epoch_checkpoint_every == 5
    assert engine.engine_config(CONFIG).epoch_checkpoint_every == 1  # the original keeps every epoch
    with pytest.raises(utils.ConfigError, match=r"c\.yaml: key 'epoch_checkpoint_every' must be >= 0, got -1"):
        utils.validate_config({'epoch_checkpoint_every': -1}, 'c.yaml')


class Crash(Exception):
    pass


@pytest.mark.parametrize('crash_at', [3, 10, 17])
def test_resume_after_interruption_is_exact(tmp_path, crash_at):
    model, opt, sched, epochs, loader = make_run()
    fit(model, opt, sched, epochs, loader, tmp_path / 'ref')
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched, epochs, loader = make_run()
    calls = {'n': 0}

    def crashing_step(m, batch, alpha):
        calls['n'] += 1
        if calls['n'] == crash_at:
            raise Crash()
        return step_fn(m, batch, alpha)

    with pytest.raises(Crash):
        fit(model, opt, sched, epochs, loader, tmp_path / 'run', step=crashing_step, save_every_steps=2)

    # A new process: fresh objects and a different global RNG state; everything must come from the checkpoint.
    model, opt, sched, epochs, loader = make_run(seed=0)
    torch.manual_seed(1234)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint_last.pth', weights_only=True)
    state = engine.restore_training(ckpt, model, opt, sched)
    fit(model, opt, sched, epochs, loader, tmp_path / 'run', state=state, save_every_steps=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_alpha_ramp_and_warmup_stepping():
    class RecordingScheduler:
        def __init__(self):
            self.steps = []

        def step(self, t):
            self.steps.append(t)

    seen = []

    def record(model, batch, alpha):
        seen.append(alpha)
        return {'loss': model.weight.sum() * 0}

    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = RecordingScheduler()
    cfg = engine.EngineConfig(alpha=0.4, warm_up=True, warmup_steps=2, print_freq=1000)
    engine.train_one_epoch(model, list(range(250)), opt, sched, record, torch.device('cpu'), cfg,
                           engine.TrainState())
    assert seen[0] == 0 and seen[125] == pytest.approx(0.2) and seen[-1] == pytest.approx(0.4 * 249 / 250)
    assert sched.steps == [0, 1, 2]  # iterations 0, 100, 200 (<= 100 * warmup_steps)
    seen.clear()
    engine.train_one_epoch(model, list(range(5)), opt, sched, record, torch.device('cpu'),
                           engine.EngineConfig(alpha=0.4, warm_up=False, print_freq=1000), engine.TrainState())
    assert seen == [0.4] * 5


def test_gradient_accumulation_steps_every_n():
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    orig = opt.step
    opt.step = lambda *a, **k: (steps.append(1), orig(*a, **k))
    batches = [torch.ones(1, 1)] * 5
    engine.train_one_epoch(model, batches, opt, type('S', (), {'step': lambda self, t: None})(),
                           lambda m, b, a: {'loss': m(b).sum()}, torch.device('cpu'),
                           engine.EngineConfig(grad_accum_steps=2, print_freq=1000), engine.TrainState(epoch=1))
    assert len(steps) == 3  # after micro-batches 2, 4 and the last one


def test_a_sigterm_whose_exit_was_swallowed_still_ends_the_epoch_at_the_next_step(tmp_path):
    """A signal handler's SystemExit raised while a __del__ runs is ignored by Python: the loop still stops."""
    guard = engine.RunGuard(str(tmp_path))

    class SwallowsTheExit:
        def __del__(self):
            try:
                guard._on_sigterm(15, None)
            except SystemExit:
                pass  # what Python does with an exception raised inside __del__

    steps = []

    def step(model, batch, alpha):
        steps.append(batch)
        if batch == 2:
            SwallowsTheExit()  # collected at once: SIGTERM "arrives" inside its __del__
        return {'loss': model.weight.sum() * 0}

    model = nn.Linear(1, 1)
    with pytest.raises(SystemExit) as exit_info:
        engine.train_one_epoch(model, list(range(10)), torch.optim.SGD(model.parameters(), lr=0.1),
                               type('S', (), {'step': lambda self, t: None})(), step, torch.device('cpu'),
                               engine.EngineConfig(print_freq=1000), engine.TrainState(), guard=guard)
    assert exit_info.value.code == engine.EXIT_TERMINATED and steps == [0, 1, 2]


def test_non_finite_loss_stops_with_named_step(tmp_path):
    model, opt, sched, epochs, loader = make_run()
    calls = {'n': 0}

    def nan_step(m, batch, alpha):
        calls['n'] += 1
        out = step_fn(m, batch, alpha)
        if calls['n'] == 13:
            out['loss_mse'] = out['loss_mse'] * float('nan')
        return out

    with pytest.raises(engine.TrainingError, match=r'non-finite loss at epoch 1 step 2: loss_mse=nan'):
        fit(model, opt, sched, epochs, loader, tmp_path, step=nan_step)
    # the checkpoint of the last good epoch is intact and loadable
    assert torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)['train_state']['epoch'] == 1


def test_resume_refuses_other_config(tmp_path):
    saved = dict(CONFIG, image_res=64)
    with pytest.raises(engine.TrainingError, match="another config \\(image_res: 64 in the checkpoint, 96 now\\)"):
        engine.check_resume_config(saved, dict(CONFIG, image_res=96), 'ck.pth')


def test_fp16_refused_on_cpu():
    with pytest.raises(utils.UserError, match='fp16 needs a CUDA device'):
        engine.autocast(torch.device('cpu'), 'fp16')
    with engine.autocast(torch.device('cpu'), 'bf16'):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
