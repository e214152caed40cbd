"""The bad-input catalogue: what a user can get wrong, and the one line each mistake produces.

Every case in CASES runs a real entry script's main (Pretrain.py, VE.py, Retrieval.py) through utils.run_cli on a
mini toy world with a tiny model, exactly as `python <script>.py ...` does, and asserts:

* exit code 2 (EXIT_USER_ERROR);
* stderr is ONE line, `error: <message>`, and the message names the culprit (file, item index, key or flag);
* no Python traceback (only `--debug` shows one, see test_debug_shows_the_traceback);
* nothing already written is lost: every file that existed before the run (inputs, a user's file in the output
  folder, a previous run's checkpoints, config.yaml and log) is still there, byte for byte, and every checkpoint
  the failed run wrote itself loads with torch.load(weights_only=True).

`pytest tests/test_bad_inputs.py -rP` prints each case's line. Inputs that are NOT errors, because a user expects
them to work, are tested after the catalogue: grayscale, CMYK and 16-bit images are converted to 8-bit RGB (the
same pixels an RGB file would give); a caption longer than max_words or than the text encoder's positions is
truncated; `skip_bad_images: true` skips (and reports) an unreadable image; `--unsafe_load` opts in to a pickled
checkpoint. Last come the checks that need real processes: the exit code and stderr of a script run as a program,
and a rank dying in a 2-process run (the other exits with one line within a timeout instead of hanging).
"""
import argparse
import builtins
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import Pretrain
import Retrieval
import utils
import VE
from tests.toy import MINI_WORLD_SIZES, ROOT, TINY_SCHED, generate_world, launch_ranks, mini_config

BAD_ITEM = 5  # index of the broken item in the 8-item pretraining annotation files below


class Expect(NamedTuple):
    """What a case runs and the one line it must print."""
    main: Callable
    argv: list
    message: str                       # regex searched in the line after 'error: '
    check: Callable | None = None      # extra assertions after the run (receives the Ctx)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a mini world, a previous run, checkpoints
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('bad_inputs') / 'world'), 3, **MINI_WORLD_SIZES)


def run_args(config, out, *extra):
    return ['--config', str(config), '--output_dir', str(out), '--device', 'cpu', '--no-distributed', *map(str, extra)]


@pytest.fixture(scope='module')
def previous_run(world, tmp_path_factory):
    """The output folder of a finished tiny pretraining (checkpoint_00/last.pth, log.txt, config.yaml)."""
    work = tmp_path_factory.mktemp('previous_run')
    config = mini_config('Pretrain', world, work / 'Pretrain.yaml')
    assert utils.run_cli(Pretrain.main, run_args(config, work / 'out')) == 0
    return str(work / 'out')


@pytest.fixture(scope='module')
def checkpoints(world, previous_run, tmp_path_factory):
    """Checkpoint files: another variant's (VE), a truncated one, one carrying pickled code, a training one."""
    import models
    from engine import build_tokenizer
    work = tmp_path_factory.mktemp('checkpoints')
    config = utils.load_config(mini_config('VE', world, work / 'VE.yaml'))
    ve = models.create_model('ve', config, build_tokenizer(config))
    torch.save({'model': ve.state_dict()}, work / 've.pth')
    training = os.path.join(previous_run, 'checkpoint_last.pth')
    data = open(training, 'rb').read()
    (work / 'truncated.pth').write_bytes(data[:len(data) // 2])
    pretrain_sd = torch.load(training, weights_only=True)['model']
    # Old-style checkpoints pickle the argparse namespace next to the weights: code that safe loading refuses.
    torch.save({'model': pretrain_sd, 'args': argparse.Namespace(lr=1e-4)}, work / 'pickled.pth')
    return {'ve': str(work / 've.pth'), 'truncated': str(work / 'truncated.pth'),
            'pickled': str(work / 'pickled.pth'), 'training': training}


class Ctx:
    """One case's sandbox: the world, a scratch folder and an output folder that holds a user's file."""

    def __init__(self, world, tmp_path, previous_run, checkpoints):
        self.world, self.tmp, self.previous_run, self.checkpoints = world, tmp_path, previous_run, checkpoints
        self.out = tmp_path / 'out'
        self.out.mkdir()
        (self.out / 'notes.txt').write_text('a user file that must survive any failed run\n')

    def config(self, name='Pretrain', **overrides) -> str:
        return mini_config(name, self.world, self.tmp / f'{name}.yaml', **overrides)

    def argv(self, config, *extra) -> list:
        return run_args(config, self.out, *extra)

    def items(self, name='pretrain.json', n=8) -> list:
        with open(os.path.join(self.world, name)) as f:
            return json.load(f)[:n]

    def write(self, name, content) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    def pretrain_with(self, mutate) -> tuple[str, list]:
        """A pretraining annotation file of 8 items after `mutate(items)`, and the argv training on it."""
        items = self.items()
        mutate(items)
        ann = self.write('pretrain_bad.json', items)
        return ann, self.argv(self.config(train_file=[ann]), '--save_every_steps', '1')

    def image_case(self, image_path) -> tuple[str, list]:
        """Pretraining whose item BAD_ITEM points at `image_path`: (annotation file, argv)."""
        ann, argv = self.pretrain_with(lambda items: items[BAD_ITEM].update(image=str(image_path)))
        return ann, argv

    def copy_previous_run(self) -> None:
        shutil.rmtree(self.out)
        shutil.copytree(self.previous_run, self.out)


@pytest.fixture
def ctx(world, tmp_path, previous_run, checkpoints):
    return Ctx(world, tmp_path, previous_run, checkpoints)


# ----------------------------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------------------------
CASES: list = []


def case(func):
    CASES.append(func)
    return func


def where(ann):
    return re.escape(f'{ann} item {BAD_ITEM}')


# Images ----------------------------------------------------------------------------------------------------------
@case
def image_missing(c):
    path = c.tmp / 'no_such_image.jpg'
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv, f'^{where(ann)}: image file not found: {re.escape(str(path))}$')


@case
def image_corrupt(c):
    path = c.write('corrupt.jpg', b'this is not a JPEG file at all' * 10)
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv, f'^{where(ann)}: cannot read image {re.escape(path)} \\(cannot identify image')


@case
def image_truncated(c):
    good = c.items()[0]['image']
    data = open(good, 'rb').read()
    path = c.write('truncated.jpg', data[:len(data) * 2 // 5])
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv, f'^{where(ann)}: cannot read image {re.escape(path)} \\(.*truncated')


@case
def image_empty_file(c):
    path = c.write('empty.jpg', b'')
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv, f'^{where(ann)}: cannot read image {re.escape(path)}')


@case
def image_path_is_a_directory(c):
    path = c.tmp / 'a_folder.jpg'
    path.mkdir()
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv, f'^{where(ann)}: image path is a directory: {re.escape(str(path))}$')


# Annotation files ------------------------------------------------------------------------------------------------
@case
def annotation_not_a_list(c):
    ann = c.write('not_a_list.json', {'image': c.items()[0]['image'], 'caption': 'a red square'})
    return Expect(Pretrain.main, c.argv(c.config(train_file=[ann])),
                  f'^{re.escape(ann)}: expected a JSON list of objects, got dict$')


@case
def annotation_empty_list(c):
    ann = c.write('empty.json', [])
    return Expect(Pretrain.main, c.argv(c.config(train_file=[ann])),
                  f'^{re.escape(ann)}: the annotation list is empty$')


@case
def annotation_missing_key(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].pop('caption'))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: missing key 'caption'$")


@case
def annotation_wrong_type(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].update(image=17))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: key 'image' must be str, got 17$")


@case
def annotation_caption_list_with_a_number(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].update(caption=['a red square', 3]))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: key 'caption' must be str or list of strings, got ")


@case
def annotation_empty_caption_list(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].update(caption=[]))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: key 'caption' is an empty list$")


@case
def annotation_item_not_an_object(c):
    ann, argv = c.pretrain_with(lambda items: items.__setitem__(BAD_ITEM, 'a red square'))
    return Expect(Pretrain.main, argv, f'^{where(ann)}: expected an object, got str$')


@case
def annotation_invalid_json(c):
    ann = c.write('broken.json', '[{"image": "a.jpg", "caption": ')
    return Expect(Pretrain.main, c.argv(c.config(train_file=[ann])),
                  f'^{re.escape(ann)}: not valid JSON \\(Expecting value at line 1 column \\d+\\)$')


@case
def annotation_file_missing(c):
    ann = str(c.tmp / 'missing.json')
    return Expect(Pretrain.main, c.argv(c.config(train_file=[ann])),
                  f'^annotation file {re.escape(ann)}: file not found$')


@case
def ve_sentence_wrong_type(c):
    items = c.items('ve_train.json', 16)
    items[1]['sentence'] = ['two', 'words']
    ann = c.write('ve_train.json', items)
    return Expect(VE.main, c.argv(c.config('VE', train_file=ann)),
                  f"^{re.escape(ann)} item 1: key 'sentence' must be str, got \\['two', 'words'\\]$")


@case
def ve_image_path_escapes_image_root(c):
    items = c.items('ve_dev.json', 16)
    items[1]['image'] = '../../etc/passwd'
    ann = c.write('ve_dev.json', items)
    return Expect(VE.main, c.argv(c.config('VE', val_file=ann)),
                  f"^{re.escape(ann)} item 1: image path '../../etc/passwd.jpg' escapes image_root .*"
                  f"allow_absolute_paths")


@case
def retrieval_absolute_image_path(c):
    items = c.items('retrieval_train.json', 16)
    items[2]['image'] = '/etc/passwd'
    ann = c.write('retrieval_train.json', items)
    config = c.config('Retrieval', train_file=[ann], batch_size_train=4, batch_size_test=4, queue_size=8, k_test=4)
    return Expect(Retrieval.main, c.argv(config),
                  f"^{re.escape(ann)} item 2: image path '/etc/passwd' escapes image_root .*allow_absolute_paths")


# Configs ---------------------------------------------------------------------------------------------------------
def config_case(c, message, **overrides):
    config = c.config(**overrides)
    return Expect(Pretrain.main, c.argv(config), f'^{re.escape(config)}: {message}')


@case
def config_unknown_key(c):
    return config_case(c, "unknown key 'colour'$", colour='red')


@case
def config_misspelled_key(c):
    return config_case(c, r"unknown key 'batch_szie' \(did you mean 'batch_size'\?\)$", batch_szie=4)


@case
def config_wrong_type(c):
    return config_case(c, "key 'image_res' must be int, got str '16'$", image_res='16')


@case
def config_zero_size(c):
    return config_case(c, "key 'batch_size' must be > 0, got 0$", batch_size=0)


@case
def config_negative_size(c):
    return config_case(c, "key 'vision_width' must be > 0, got -32$", vision_width=-32)


@case
def config_queue_smaller_than_batch(c):
    return config_case(c, r"key 'queue_size' \(2\) is smaller than 'batch_size' \(4\); the queue must hold",
                       queue_size=2)


@case
def config_nested_misspelled_key(c):
    return config_case(c, r"unknown key 'optimizer.weight_decya' \(did you mean 'weight_decay'\?\)$",
                       optimizer={'opt': 'adamW', 'lr': 1e-4, 'weight_decya': 0.02})


@case
def config_unknown_flip_mode(c):
    return config_case(c, r"key 'augment.hflip' must be bool, got str 'sideways'$",
                       augment={'hflip': 'sideways'})


@case
def config_unknown_augmentation_op(c):
    return config_case(c, r"key 'augment.randaug_ops' names an unknown op 'Rotat' \(did you mean 'Rotate'\?\)",
                       augment={'randaug_ops': ['Identity', 'Rotat']})


@case
def config_not_a_finite_number(c):
    config = c.config()
    return Expect(Pretrain.main, c.argv(config, '--opt', 'temp=.nan'),
                  f"^{re.escape(config)}: key 'temp' must be a finite number, got nan$")


@case
def config_python_object_tag(c):
    marker = c.tmp / 'pwned'
    config = c.config()
    payload = f'image_res: !!python/object/apply:os.system ["touch {marker}"]\n'
    text = open(config).read().replace('image_res: 16\n', payload)
    config = c.write('evil.yaml', text)

    def not_run(c):
        assert not marker.exists()
    return Expect(Pretrain.main, c.argv(config),
                  f'^{re.escape(config)}:\\d+:\\d+: cannot parse YAML: could not determine a constructor for the tag '
                  f"'tag:yaml.org,2002:python/object/apply:os.system' \\(configs are read in YAML safe mode",
                  not_run)


@case
def config_yaml_syntax_error(c):
    config = c.write('syntax.yaml', open(c.config()).read() + 'batch_size: 4: 5\n')
    return Expect(Pretrain.main, c.argv(config), f'^{re.escape(config)}:\\d+:\\d+: cannot parse YAML: ')


@case
def config_not_utf8(c):
    config = c.write('latin1.yaml', open(c.config(), 'rb').read() + '# caf\xe9\n'.encode('latin-1'))
    return Expect(Pretrain.main, c.argv(config),
                  f'^{re.escape(config)}: not UTF-8 text \\(byte 0xe9 at offset \\d+\\)$')


@case
def config_missing_required_key(c):
    config = c.config()
    values = utils.load_config(config)
    del values['train_file']
    utils.save_config(values, config)
    return Expect(Pretrain.main, c.argv(config), f"^{re.escape(config)}: missing required key 'train_file'$")


@case
def config_file_missing(c):
    config = str(c.tmp / 'no_such_config.yaml')
    return Expect(Pretrain.main, c.argv(config), f'^config file not found: {re.escape(config)}$')


@case
def override_not_yaml(c):
    return Expect(Pretrain.main, c.argv(c.config(), '--opt', 'image_res=[16'),
                  r'^--opt image_res=\[16: the value is not valid YAML')


# Checkpoints -----------------------------------------------------------------------------------------------------
@case
def checkpoint_of_another_variant(c):
    path = c.checkpoints['ve']
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f"^{re.escape(path)}: a 've' checkpoint cannot initialise a 'pretrain' model")


@case
def checkpoint_truncated(c):
    path = c.checkpoints['truncated']
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f'^cannot read checkpoint {re.escape(path)}: the file is truncated or corrupt')


@case
def checkpoint_with_pickled_code(c):
    path = c.checkpoints['pickled']
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f'^checkpoint {re.escape(path)} contains pickled Python objects \\(argparse.Namespace\\) that safe '
                  f'loading \\(torch.load weights_only=True\\) refuses; if you trust this file, .*--unsafe_load')


@case
def checkpoint_missing(c):
    path = str(c.tmp / 'no_such.pth')
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f'^checkpoint file not found: {re.escape(path)}$')


@case
def resume_from_another_tasks_checkpoint(c):
    path = c.checkpoints['training']
    return Expect(VE.main, c.argv(c.config('VE'), '--resume', '--checkpoint', path),
                  f"^{re.escape(path)}: cannot resume a 've' run from a 'pretrain' checkpoint; to start from its "
                  f"weights, pass it with --checkpoint and without --resume$")


@case
def resume_with_another_config(c):
    c.copy_previous_run()
    return Expect(Pretrain.main, c.argv(c.config(image_res=32), '--resume'),
                  f'^{re.escape(str(c.out / "checkpoint_last.pth"))}: cannot resume, the checkpoint was made with '
                  f'another config \\(image_res: 16 in the checkpoint, 32 now\\)$')


@case
def resume_without_a_checkpoint(c):
    return Expect(Pretrain.main, c.argv(c.config(), '--resume'),
                  f'^--resume: no checkpoint to resume from at {re.escape(str(c.out / "checkpoint_last.pth"))}$')


# Output folder ---------------------------------------------------------------------------------------------------
@case
def output_dir_holds_another_run(c):
    c.copy_previous_run()
    return Expect(Pretrain.main, c.argv(c.config()),
                  f'^--output_dir {re.escape(str(c.out))} already holds a run \\(checkpoint_00.pth, ...\\); pass '
                  f'--resume to continue it or --overwrite to start over there$')


@case
def output_dir_is_a_file(c):
    path = c.write('a_file', 'not a folder')
    return Expect(Pretrain.main, run_args(c.config(), path), f'^--output_dir {re.escape(path)}: exists and is not a '
                                                             f'directory$')


# Training --------------------------------------------------------------------------------------------------------
@case
def diverging_training_nan(c):
    """A learning rate of 1e10 blows the weights up after the first step: stop with one line, keep the step-1
    checkpoint (finite weights) rather than overwrite it with a diverged one."""
    config = c.config(schedular=dict(TINY_SCHED, lr=1e10, warmup_lr=1e10))

    def last_good_checkpoint_kept(c):
        ckpt = torch.load(c.out / 'checkpoint_last.pth', weights_only=True)
        assert ckpt['train_state']['step_in_epoch'] >= 1
        assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    # Where the divergence shows first (the loss, the weights, or an op inside the forward) depends on the model;
    # the stop, its one line and the kept checkpoint do not.
    return Expect(Pretrain.main, c.argv(config, '--save_every_steps', '1'),
                  r'^non-finite (loss|weights|values inside the forward)\b.* at epoch 0 step \d+\b.*; stopping '
                  r'\(the last good checkpoint is kept\)$',
                  last_good_checkpoint_kept)


@case
def fp16_on_cpu(c):
    return Expect(Pretrain.main, c.argv(c.config(), '--precision', 'fp16'),
                  r'^--precision fp16 needs a CUDA device \(it is unusably slow on CPU\); use bf16$')


@case
def batch_larger_than_the_data(c):
    config = c.config(batch_size=64, queue_size=64)
    ann = os.path.join(c.world, 'pretrain.json')
    return Expect(Pretrain.main, c.argv(config),
                  f'^the training set \\({re.escape(ann)}\\) has 24 items, fewer than one batch of 64 per process '
                  f'\\(1 process\\): lower the batch size$')


# ----------------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------------
def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_nothing_lost(before: dict, folder) -> None:
    after = snapshot(folder)
    lost = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    assert not lost and not changed, f'lost {lost}, changed {changed}'


def assert_written_files_load(out) -> None:
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith('checkpoint') and name.endswith('.pth'):
            torch.load(path, weights_only=True)
        elif name == 'log.txt':
            [json.loads(line) for line in open(path)]
        assert not name.endswith(utils.TMP_SUFFIX), f'partial file left: {name}'


def test_catalogue_size():
    assert len(CASES) >= 25


def run_case(name: str, expect: Expect, ctx, capsys, *, time_limit: float | None = None,
             no_new_config: bool = False) -> str:
    """Run one catalogue case and assert the promise: exit status 2, one line `error: ...` matching the case's
    message, no traceback, (optionally) within `time_limit` seconds, every file that existed before unchanged,
    every checkpoint the run wrote loadable, (with `no_new_config`) no config.yaml written by the failed run, and
    the case's own check. Returns the line (printed for the catalogue listing, `pytest -rP`)."""
    before = snapshot(ctx.tmp)
    started = time.monotonic()
    code = utils.run_cli(expect.main, expect.argv)
    elapsed = time.monotonic() - started
    ctx.elapsed = elapsed
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == utils.EXIT_USER_ERROR, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    message = lines[0][len('error: '):]
    assert re.search(expect.message, message), f'{message!r} does not match {expect.message!r}'
    assert 'Traceback' not in out + err
    assert time_limit is None or elapsed < time_limit, f'{name} took {elapsed:.0f} s'
    monkeypatch = getattr(ctx, 'monkeypatch', None)
    if monkeypatch is not None:
        monkeypatch.undo()  # the checks below use the real torch.save / os.write
    assert_nothing_lost(before, ctx.tmp)
    assert_written_files_load(ctx.out)
    if no_new_config and 'out/config.yaml' not in before:
        assert not (ctx.out / 'config.yaml').exists(), 'a failed run wrote config.yaml'
    if expect.check is not None:
        expect.check(ctx)
    print(f'{name}: {lines[0]}')
    return lines[0]


@pytest.mark.parametrize('make_case', CASES, ids=lambda f: f.__name__)
def test_bad_input(make_case, ctx, capsys):
    run_case(make_case.__name__, make_case(ctx), ctx, capsys)


def test_debug_shows_the_traceback(ctx):
    expect = config_unknown_key(ctx)
    with pytest.raises(utils.ConfigError, match="unknown key 'colour'"):
        utils.run_cli(expect.main, expect.argv + ['--debug'])


def test_error_line_stays_one_line(capsys):
    def main(argv):
        raise utils.ConfigError("c.yaml: unknown key 'a\nb'")
    assert utils.run_cli(main, []) == utils.EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: c.yaml: unknown key 'a\\nb'\n"


def test_error_of_a_silenced_rank_is_printed(capsys, monkeypatch):
    """Ranks > 0 have `print` silenced (setup_for_distributed); their error line must still reach stderr."""
    monkeypatch.setattr(builtins, 'print', builtins.print)  # restored after the test
    utils.setup_for_distributed(False)
    monkeypatch.setattr(utils.errors, 'get_world_size', lambda: 2)  # where the error line reads them
    monkeypatch.setattr(utils.errors, 'get_rank', lambda: 1)

    def main(argv):
        raise utils.UserError('ann.json item 3: cannot read image x.jpg')
    assert utils.run_cli(main, []) == utils.EXIT_USER_ERROR
    assert capsys.readouterr().err == 'error: rank 1 of 2: ann.json item 3: cannot read image x.jpg\n'


# ----------------------------------------------------------------------------------------------------------------
# Inputs that must work (what a user expects), not fail
# ----------------------------------------------------------------------------------------------------------------
def _gray_variants(ctx):
    """A grayscale PNG, a CMYK JPEG and a 16-bit PNG made from world images, with the RGB image each must equal."""
    items = ctx.items()
    rgb = [np.asarray(Image.open(it['image']).convert('RGB')) for it in items[:3]]
    gray = np.asarray(Image.fromarray(rgb[0]).convert('L'))
    variants = {
        'gray.png': (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        'cmyk.jpg': (Image.fromarray(rgb[1]).convert('CMYK'), rgb[1]),
        'deep16.png': (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, axis=2)),
    }
    paths = {}
    for name, (img, expected) in variants.items():
        path = str(ctx.tmp / name)
        img.save(path, quality=100) if name.endswith('.jpg') else img.save(path)
        paths[name] = (path, expected)
    return paths


def test_grayscale_cmyk_and_16bit_images_load_as_rgb_and_train(ctx):
    from dataset.utils import open_image_rgb
    variants = _gray_variants(ctx)
    assert Image.open(variants['deep16.png'][0]).mode.startswith('I')  # really 16-bit on disk
    assert Image.open(variants['cmyk.jpg'][0]).mode == 'CMYK'
    for name, (path, expected) in variants.items():
        img = open_image_rgb(path)
        assert img.mode == 'RGB' and img.size == (expected.shape[1], expected.shape[0])
        diff = np.abs(np.asarray(img, dtype=np.int16) - expected.astype(np.int16))
        # PNGs are lossless: the same pixels; the CMYK JPEG is lossy (and PIL's CMYK round trip is exact).
        assert diff.max() == 0 if name.endswith('.png') else diff.mean() < 3, name

    def use_variants(items):
        for item, (path, _) in zip(items, variants.values()):
            item['image'] = path
    _, argv = ctx.pretrain_with(use_variants)
    assert utils.run_cli(Pretrain.main, argv) == 0


def test_skip_bad_images_skips_and_reports(ctx):
    path = ctx.write('corrupt.jpg', b'not an image')
    ann, _ = ctx.image_case(path)
    config = ctx.config(train_file=[ann], skip_bad_images=True)
    with pytest.warns(UserWarning, match=f'skipping bad item: {where(ann)}: cannot read image {re.escape(path)}'):
        assert utils.run_cli(Pretrain.main, ctx.argv(config)) == 0
    assert json.loads(open(ctx.out / 'log.txt').readline())['epoch'] == 0


def test_text_longer_than_max_words_is_truncated(ctx):
    """Captions longer than max_words, and (with max_words raised) longer than the tiny text encoder's 64
    positions: truncated, in pretraining and in retrieval fine-tuning (where the original keeps captions untruncated up
    to that limit), instead of a crash in the position embeddings."""
    long = ' '.join(['a big red square left of a small blue circle'] * 30)  # 300 words
    _, argv = ctx.pretrain_with(lambda items: [it.update(caption=long) for it in items])
    assert utils.run_cli(Pretrain.main, argv) == 0
    items = ctx.items('retrieval_train.json', 16)
    for it in items:
        it['caption'] = long
    ann = ctx.write('long_retrieval.json', items)
    config = ctx.config('Retrieval', train_file=[ann], max_words=400, batch_size_train=4, batch_size_test=4,
                        queue_size=8, k_test=4)
    assert utils.run_cli(Retrieval.main, run_args(config, ctx.tmp / 'retrieval_out', '--max_steps_per_epoch', 2)) == 0


def test_unsafe_load_opts_in_to_pickled_checkpoints(ctx):
    argv = ctx.argv(ctx.config(), '--checkpoint', ctx.checkpoints['pickled'], '--unsafe_load', '--max_steps_per_epoch',
                    '1')
    assert utils.run_cli(Pretrain.main, argv) == 0


# ----------------------------------------------------------------------------------------------------------------
# Real processes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('make_case', [config_unknown_key, image_corrupt], ids=lambda f: f.__name__)
def test_script_as_a_program(make_case, ctx):
    """`python Pretrain.py ...` itself: exit status 2 and one stderr line, no traceback."""
    expect = make_case(ctx)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'Pretrain.py'), *expect.argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert lines[-1].startswith('error: ') and re.search(expect.message, lines[-1][len('error: '):])


def test_rank_dying_in_a_two_process_run(ctx):
    """Rank 1 is SIGKILLed mid-training; rank 0 must not hang in its next collective but exit within a minute
    with one line (exit 3), and the checkpoints it wrote stay loadable."""
    config = ctx.config(schedular=dict(TINY_SCHED, epochs=100), print_freq=1)
    rank0, rank1 = launch_ranks('Pretrain.py', ['--config', config, '--output_dir', ctx.out, '--device', 'cpu',
                                                '--save_every_steps', '1'])
    errors: list = []
    drain = threading.Thread(target=lambda: errors.extend(rank0.stderr), daemon=True)
    drain.start()
    # Whatever happens, nothing outlives the test (a hang shows as a failure, not as a stuck suite).
    watchdog = threading.Timer(300, lambda: [p.kill() for p in (rank0, rank1)])
    watchdog.start()
    try:
        for line in rank0.stdout:  # rank 0 reports every step; wait for training to be under way
            if line.startswith('Train epoch [1]'):
                break
        else:
            pytest.fail(f'rank 0 ended before training: {rank0.wait()} {"".join(errors)[-2000:]}')
        rank1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rank0.stdout.read()
        rank0.wait(timeout=120)
        waited = time.monotonic() - killed
        drain.join()
    finally:
        watchdog.cancel()
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.communicate()
    err = ''.join(errors)
    assert waited < 60, f'rank 0 took {waited:.0f} s to notice'
    assert rank0.returncode == utils.EXIT_PEER_LOST, err[-2000:]
    assert 'Traceback' not in err
    assert re.match(r'error: rank 0 of 2: lost contact with the other processes \(.+\); another rank failed or was '
                    r'killed, see its output$', err.strip().splitlines()[-1])
    assert_written_files_load(ctx.out)
    print(err.strip().splitlines()[-1])
