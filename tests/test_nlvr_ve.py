"""NLVR.py, VE.py, Pretrain_nlvr.py and the shared classification evaluator (evaluation/classification.py).

Fast tests: evaluator correctness on a handmade model and loader (with the padded duplicates of a sharded
DistributedSampler), step/predict shapes of the three scripts on tiny models, VE best-epoch bookkeeping, --evaluate,
and one-line errors for bad input. Slow tests: the three scripts learn on the toy world (CPU, from the shared
`toy_pretrain` fixture).
"""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import NLVR
import Pretrain_nlvr
import VE
import utils
from dataset import DataError, create_dataset
from evaluation import classification
from evaluation.common import merge_shards
from tests.toy import MINI_WORLD_SIZES, TINY_SCHED as SCHED, generate_world, make_toy_config, mini_config

# ----------------------------------------------------------------------------------------------------------------
# The evaluator on a handmade model and loader
# ----------------------------------------------------------------------------------------------------------------


class Items(Dataset):
    """Item i = (i, label_i); the 'model' predicts class (i % 3) so the right answers are known."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(i), self.labels[i]


class ModFake(torch.nn.Module):
    """Logits with the maximum at class (x % num_classes); records the mode it was called in."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return torch.nn.functional.one_hot(x % self.num_classes, self.num_classes).float()


def predict_fn(model, batch):
    x, y = batch
    return model(x), y


LABELS = [0, 1, 2, 0, 1, 1, 2, 2, 2, 1]  # predictions are i % 3 = 0 1 2 0 1 2 0 1 2 0
NAMES = ('a', 'b', 'c')


def test_evaluator_metrics_on_handmade_model():
    model = ModFake().train()
    loader = DataLoader(Items(LABELS), batch_size=4)
    m = classification.evaluate(model, loader, predict_fn, NAMES, print_freq=100)
    # correct at i = 0, 1, 2, 3, 4, 8 -> 6 of 10
    assert m['acc'] == pytest.approx(0.6) and m['n'] == 10
    assert m['per_class_n'] == {'a': 2, 'b': 4, 'c': 4}
    assert m['per_class_acc'] == pytest.approx({'a': 1.0, 'b': 0.5, 'c': 0.5})
    assert m['confusion'] == [[2, 0, 0], [1, 2, 1], [1, 1, 2]]
    assert m['mean_per_class_acc'] == pytest.approx(2 / 3)
    assert model.modes and not any(model.modes) and model.training  # eval during the pass, train mode restored


def test_accuracy_metrics_class_without_items_and_bad_class():
    m = classification.accuracy_metrics([0, 0], [0, 1], ('x', 'y', 'z'))
    assert m['per_class_acc'] == {'x': 1.0, 'y': 0.0, 'z': None} and m['acc'] == 0.5
    with pytest.raises(ValueError, match='outside the 2 classes'):
        classification.accuracy_metrics([2], [0], ('x', 'y'))


def test_evaluator_drops_distributed_padding(monkeypatch):
    """10 items over 4 ranks: DistributedSampler pads to 12 (items 0 and 1 twice); each item must count once."""
    data, world = Items(LABELS), 4
    loaders = [DataLoader(data, batch_size=2, sampler=DistributedSampler(data, world, r, shuffle=False))
               for r in range(world)]
    shards = [classification.collect_predictions(ModFake(), ld, predict_fn, print_freq=100) for ld in loaders]
    assert sum(len(s['index']) for s in shards) == 12  # the padded duplicates are really there
    naive = sum(p == t for s in shards for p, t in zip(s['pred'], s['target'])) / 12
    assert naive != pytest.approx(0.6)  # what the original's weighted all-reduce would report (8/12)

    # Simulate the gather of a 4-rank run: the evaluate of every rank sees the shards of all ranks.
    monkeypatch.setattr(utils, 'all_gather_object', lambda obj: shards)
    for ld in loaders:
        m = classification.evaluate(ModFake(), ld, predict_fn, NAMES, print_freq=100)
        assert m['acc'] == pytest.approx(0.6) and m['n'] == 10
    merged = merge_shards(shards, ('pred', 'target'))
    assert merged['index'] == list(range(10)) and merged['target'] == LABELS


def test_evaluator_refuses_partial_or_shuffled_loaders():
    with pytest.raises(RuntimeError, match='cover 8 of 10 items'):
        classification.evaluate(ModFake(), DataLoader(Items(LABELS), batch_size=4, drop_last=True), predict_fn,
                                NAMES, print_freq=100)
    with pytest.raises(ValueError, match='must not shuffle'):
        classification.evaluate(ModFake(), DataLoader(Items(LABELS), batch_size=4, shuffle=True), predict_fn,
                                NAMES, print_freq=100)


# ----------------------------------------------------------------------------------------------------------------
# The scripts on a mini world with tiny models
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mini_world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('mini') / 'world'), 3, **MINI_WORLD_SIZES)


def run_args(cfg, out, *extra):
    return ['--config', cfg, '--output_dir', str(out), '--device', 'cpu', '--no-distributed', *extra]


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


@pytest.fixture(scope='module')
def mini_pretrain_ckpt(mini_world, tmp_path_factory):
    """A pretraining-layout checkpoint of the tiny model (random weights; only the layout matters here)."""
    import models
    from engine import build_tokenizer
    config = utils.load_config(mini_config('Pretrain', mini_world, tmp_path_factory.mktemp('c') / 'p.yaml'))
    model = models.create_model('pretrain', config, build_tokenizer(config))
    path = str(tmp_path_factory.mktemp('ckpt') / 'pretrain.pth')
    torch.save({'model': model.state_dict()}, path)
    return path


def test_step_and_predict_shapes(mini_world, tmp_path):
    import models
    from engine import build_tokenizer
    for name, task, script, n_cls in (('NLVR', 'nlvr', NLVR, 2), ('VE', 've', VE, 3)):
        config = utils.load_config(mini_config(name, mini_world, tmp_path / f'{name}.yaml'))
        tok = build_tokenizer(config)
        model = models.create_model(task, config, tok)
        train_set = create_dataset(task, config)[0]
        batch = next(iter(DataLoader(train_set, batch_size=3)))
        losses = script.make_step_fn(tok, torch.device('cpu'), 64)(model, batch, 0.4)
        assert set(losses) == {'loss'} and losses['loss'].dim() == 0 and torch.isfinite(losses['loss'])
        losses['loss'].backward()
        logits, targets = script.make_predict_fn(tok, torch.device('cpu'), 64, 'fp32')(model.eval(), batch)
        assert logits.shape == (3, n_cls) and targets.shape == (3,)
        if task == 'nlvr':  # the two images of an item are distinct tensors, each with its own transform
            assert batch[0].shape == batch[1].shape == (3, 3, 16, 16)
    config = utils.load_config(mini_config('NLVR_pretrain', mini_world, tmp_path / 'ta.yaml'))
    tok = build_tokenizer(config)
    model = models.create_model('pretrain_nlvr', config, tok)
    batch = next(iter(DataLoader(create_dataset('nlvr_pretrain', config), batch_size=4)))
    losses = Pretrain_nlvr.make_step_fn(tok, torch.device('cpu'))(model, batch, 0.0)
    assert set(losses) == {'loss'} and losses['loss'].dim() == 0


def test_pretrain_nlvr_then_nlvr_then_evaluate(mini_world, mini_pretrain_ckpt, tmp_path):
    """The chain of the issue: TA from a pretraining checkpoint -> NLVR from the TA checkpoint -> --evaluate."""
    ta_out, nlvr_out, eval_out = tmp_path / 'ta', tmp_path / 'nlvr', tmp_path / 'eval'
    ta_cfg = mini_config('NLVR_pretrain', mini_world, tmp_path / 'ta.yaml')
    Pretrain_nlvr.main(run_args(ta_cfg, ta_out, '--checkpoint', mini_pretrain_ckpt))
    assert (ta_out / 'checkpoint_00.pth').is_file()
    assert 'train_loss' in log_lines(ta_out)[0]

    cfg = mini_config('NLVR', mini_world, tmp_path / 'nlvr.yaml', schedular={**SCHED, 'epochs': 2})
    state = NLVR.main(run_args(cfg, nlvr_out, '--checkpoint', str(ta_out / 'checkpoint_00.pth')))
    lines = log_lines(nlvr_out)
    assert [r['epoch'] for r in lines[:2]] == [0, 1]
    assert {'train_loss', 'train_lr', 'val_acc', 'test_acc', 'val_per_class_acc'} <= set(lines[0])
    assert lines[-1]['best_epoch'] == state.best_epoch
    assert (nlvr_out / 'checkpoint_00.pth').is_file() and (nlvr_out / 'checkpoint_01.pth').is_file()
    assert torch.load(nlvr_out / 'checkpoint_best.pth', weights_only=True)['epoch'] == state.best_epoch
    results = json.load(open(nlvr_out / 'results.json'))
    assert results['best_epoch'] == state.best_epoch and results['best']['val']['n'] == 2 * 8

    record = NLVR.main(run_args(cfg, eval_out, '--checkpoint', str(nlvr_out / 'checkpoint_best.pth'),
                                '--evaluate'))
    best = lines[state.best_epoch]
    assert record['val_acc'] == pytest.approx(best['val_acc']) and record['test_acc'] == pytest.approx(best['test_acc'])
    assert not any(n.startswith('checkpoint') for n in os.listdir(eval_out))

    # A TA checkpoint has no classifier head: --evaluate refuses it with one line naming the file and its kind.
    with pytest.raises(utils.UserError, match=r"checkpoint_00.pth is a 'pretrain_nlvr' checkpoint"):
        NLVR.main(run_args(cfg, tmp_path / 'eval2', '--checkpoint', str(ta_out / 'checkpoint_00.pth'),
                           '--evaluate'))


def test_nlvr_directly_from_pretrain_checkpoint(mini_world, mini_pretrain_ckpt, tmp_path, capsys):
    cfg = mini_config('NLVR', mini_world, tmp_path / 'nlvr.yaml')
    NLVR.main(run_args(cfg, tmp_path / 'out', '--checkpoint', mini_pretrain_ckpt, '--max_steps_per_epoch', '1'))
    assert '(pretrain -> nlvr)' in capsys.readouterr().out


def test_ve_best_epoch_is_tracked(mini_world, mini_pretrain_ckpt, tmp_path, monkeypatch):
    """The original never updated VE's best epoch; here checkpoint_best.pth, log.txt and results.json agree on the
    epoch with the highest val accuracy (scripted: 0.5, 0.8, 0.7 -> epoch 1)."""
    val_accs = iter([0.5, 0.8, 0.7])
    real_metrics = classification.accuracy_metrics

    def scripted(preds, targets, names):
        m = real_metrics(preds, targets, names)
        if len(targets) == 3 * 8 and scripted.split == 'val':
            m['acc'] = next(val_accs)
        scripted.split = 'test' if scripted.split == 'val' else 'val'
        return m
    scripted.split = 'val'  # EpochEvaluator evaluates val, then test
    monkeypatch.setattr(classification, 'accuracy_metrics', scripted)
    cfg = mini_config('VE', mini_world, tmp_path / 've.yaml', schedular={**SCHED, 'epochs': 3})
    out = tmp_path / 'out'
    state = VE.main(run_args(cfg, out, '--checkpoint', mini_pretrain_ckpt, '--max_steps_per_epoch', '1'))
    lines = log_lines(out)
    assert [r['val_acc'] for r in lines[:3]] == [0.5, 0.8, 0.7]
    assert state.best_epoch == 1 and lines[-1] == {'best_epoch': 1, 'best_val_acc': 0.8}
    assert torch.load(out / 'checkpoint_best.pth', weights_only=True)['epoch'] == 1
    assert json.load(open(out / 'results.json'))['best_epoch'] == 1
    assert not (out / 'checkpoint_00.pth').exists()  # VE keeps only the best (and last) checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the culprit, end to end
# ----------------------------------------------------------------------------------------------------------------
def _write_bad(world, name, mutate, tmp_path):
    items = json.load(open(os.path.join(world, name)))
    mutate(items[1])
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


def test_nlvr_item_with_missing_second_image(mini_world, tmp_path, capsys):
    bad = _write_bad(mini_world, 'nlvr_dev.json', lambda it: it['images'].pop(), tmp_path)
    cfg = mini_config('NLVR', mini_world, tmp_path / 'c.yaml', val_file=[bad])
    assert utils.run_cli(NLVR.main, run_args(cfg, tmp_path / 'o')) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f'{bad} item 1' in err and "'images' must list exactly 2 image paths, got 1" in err


def test_ve_label_outside_label_set(mini_world, tmp_path, capsys):
    bad = _write_bad(mini_world, 've_train.json', lambda it: it.update(label='maybe'), tmp_path)
    cfg = mini_config('VE', mini_world, tmp_path / 'c.yaml', train_file=bad)
    assert utils.run_cli(VE.main, run_args(cfg, tmp_path / 'o')) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{bad} item 1' in err and "'maybe'" in err and 'entailment' in err


def test_nlvr_label_outside_label_set(mini_world, tmp_path, capsys):
    bad = _write_bad(mini_world, 'nlvr_test.json', lambda it: it.update(label='true'), tmp_path)
    cfg = mini_config('NLVR', mini_world, tmp_path / 'c.yaml', test_file=[bad])
    with pytest.raises(DataError, match=rf"{bad} item 1: key 'label' must be the string 'True' or 'False', "
                                        r"got 'true'"):
        NLVR.main(run_args(cfg, tmp_path / 'o'))


def test_checkpoint_without_fusion_layers(mini_world, tmp_path, capsys):
    """A pretraining checkpoint whose text encoder has no cross-attention has no fusion layers to duplicate."""
    import models
    from engine import build_tokenizer
    config = utils.load_config(mini_config('Pretrain', mini_world, tmp_path / 'p.yaml'))
    sd = models.create_model('pretrain', config, build_tokenizer(config)).state_dict()
    sd = {k: v for k, v in sd.items() if '.crossattention.' not in k}
    ckpt = tmp_path / 'no_fusion.pth'
    torch.save({'model': sd}, ckpt)
    cfg = mini_config('NLVR_pretrain', mini_world, tmp_path / 'ta.yaml')
    assert utils.run_cli(Pretrain_nlvr.main, run_args(cfg, tmp_path / 'o', '--checkpoint', str(ckpt))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt) in err and 'text_encoder' in err


def test_pretrain_nlvr_batch_too_small(mini_world, tmp_path):
    cfg = mini_config('NLVR_pretrain', mini_world, tmp_path / 'ta.yaml', batch_size=2)
    with pytest.raises(utils.ConfigError, match="'batch_size' must be >= 3"):
        Pretrain_nlvr.main(run_args(cfg, tmp_path / 'o'))


# ----------------------------------------------------------------------------------------------------------------
# Learning on the toy world (slow; CPU; from the shared toy pretraining)
# ----------------------------------------------------------------------------------------------------------------
# Epochs of the learning tests (the toy configs' own epoch counts are for the reported, longer runs).
TEST_EPOCHS = {'NLVR': 2, 'VE': 2}


def toy_config_epochs(name, world, path, epochs):
    """configs/toy/<name>.yaml on `world` with `epochs` epochs (the rest of its schedule unchanged)."""
    sched = utils.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'toy', f'{name}.yaml'))
    return make_toy_config(name, world, path, schedular={**sched['schedular'], 'epochs': epochs})


@pytest.fixture(scope='module')
def toy_ta(toy_world, toy_pretrain, tmp_path_factory):
    """TA pretraining (configs/toy/NLVR_pretrain.yaml) from the shared toy pretraining, recording every step's loss.
    Returns (output dir, list of per-step losses)."""
    work = tmp_path_factory.mktemp('toy_ta')
    cfg = make_toy_config('NLVR_pretrain', toy_world, str(work / 'NLVR_pretrain.yaml'))
    losses = []
    real = Pretrain_nlvr.make_step_fn

    def recording(*a, **k):
        step = real(*a, **k)

        def wrapped(model, batch, alpha):
            out = step(model, batch, alpha)
            losses.append(out['loss'].item())
            return out
        return wrapped
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pretrain_nlvr, 'make_step_fn', recording)
        Pretrain_nlvr.main(run_args(cfg, work / 'out', '--checkpoint',
                                    os.path.join(toy_pretrain, 'checkpoint_last.pth')))
    return str(work / 'out'), losses


@pytest.mark.slow
def test_toy_ta_pretraining_loss_falls(toy_ta):
    out, losses = toy_ta
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f'TA loss: first 5 steps {start:.4f}, last 10 steps {end:.4f} ({len(losses)} steps; chance ln 3 = 1.0986)')
    assert os.path.isfile(os.path.join(out, 'checkpoint_00.pth'))
    assert end < start - 0.1 and end < 1.0


@pytest.mark.slow
def test_toy_ve_learns(toy_world, toy_pretrain, tmp_path):
    cfg = toy_config_epochs('VE', toy_world, str(tmp_path / 'VE.yaml'), TEST_EPOCHS['VE'])
    state = VE.main(run_args(cfg, tmp_path / 'out', '--checkpoint',
                             os.path.join(toy_pretrain, 'checkpoint_last.pth')))
    best = json.load(open(tmp_path / 'out' / 'results.json'))['best']
    print(f"VE best epoch {state.best_epoch}: val {best['val']['acc']:.4f}, test {best['test']['acc']:.4f} "
          f"(per class {best['test']['per_class_acc']}; chance 0.333)")
    assert best['test']['acc'] > 0.5 and best['val']['acc'] > 0.5
