"""The bad-input catalogue, continued: configs, command-line flags and output folders.

Same contract as tests/test_bad_inputs.py, whose fixtures (a mini toy world, a finished tiny pretraining, its
checkpoints) and helpers this file reuses: every case runs a real entry script's main through utils.run_cli and
must end with exit status 2, ONE stderr line `error: <message>` naming the culprit (file, key or flag), no
traceback, and every file that existed before the run unchanged byte for byte (a user's config.yaml in the output
folder, the --config file kept there, a finished run's config.yaml, log.txt and result files).

The cases cover the output folder (nothing is written before the inputs are checked, and no file a run did not
write is replaced without --overwrite), config files that would make the loader hang or take gigabytes (alias
bombs, deep nesting, FIFOs, devices), values that are of the right type but out of range (declared beside each
key's type in utils.CONFIG_SCHEMA), and flags. `pytest tests/test_bad_inputs_config.py -rP` prints each line.
After the catalogue: runs that must still work (a config.yaml left by a killed start, --overwrite), and the
released configs, which must keep loading.
"""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import Grounding
import NLVR
import optim
import Pretrain
import Pretrain_nlvr
import Retrieval
import scheduler
import utils
import VE
import VQA
from tests.test_bad_inputs import (BAD_ITEM, Ctx, Expect, assert_nothing_lost, assert_written_files_load,  # noqa: F401
                                   checkpoints, previous_run, run_args, run_case, snapshot, world)
from tests.toy import ROOT, TINY_BERT

RETRIEVAL_MINI = dict(batch_size_train=4, batch_size_test=4, queue_size=8, k_test=4)
BOMB_SECONDS = 2.0


class ConfigCtx(Ctx):
    """Ctx with a monkeypatch (for cases that pretend a machine has CUDA, or set the environment) and the time the
    run took."""

    def __init__(self, *args, monkeypatch):
        super().__init__(*args)
        self.monkeypatch = monkeypatch
        self.elapsed = None

    def config(self, name='Pretrain', **overrides) -> str:
        if name == 'Retrieval':
            overrides = {**RETRIEVAL_MINI, **overrides}
        return super().config(name, **overrides)

    def user_file(self, name, text) -> str:
        """A file of the user's in the output folder."""
        path = self.out / name
        path.write_text(text)
        return str(path)

    def finished_run(self, *result_files) -> str:
        """The output folder holds a finished training run (config.yaml, log.txt, checkpoints) and result files."""
        self.copy_previous_run()
        for name in result_files:
            (self.out / name).write_text('{"epochs": {"0": {"acc": 0.75}}}\n')
        return str(self.out)

    def outside(self, name) -> str:
        """A path in a scratch folder beside (not under) the case's folder, for things the hash check must not
        open (a FIFO)."""
        folder = self.tmp.parent / f'{self.tmp.name}_outside'
        folder.mkdir(exist_ok=True)
        return str(folder / name)


@pytest.fixture
def ctx(world, tmp_path, previous_run, checkpoints, monkeypatch):
    return ConfigCtx(world, tmp_path, previous_run, checkpoints, monkeypatch=monkeypatch)


CASES: list = []


def case(func):
    CASES.append(func)
    return func


def config_case(c, name, main, message, *extra, **overrides):
    """A case of script `main` on the mini config `name` with `overrides`; `message` follows '<config file>: '."""
    config = c.config(name, **overrides)
    return Expect(main, c.argv(config, *extra), f'^{re.escape(config)}: {message}')


def flag_case(c, name, main, message, *extra, **overrides):
    """A case of a bad flag: argparse's error as one line, 'argument --flag: ... (see --help)'."""
    return Expect(main, c.argv(c.config(name, **overrides), *extra), f'^argument {message} \\(see --help\\)$')


def refuses_output_dir(c, message):
    return f'^--output_dir {re.escape(str(c.out))} {message}'


# Output folder: nothing written before the inputs are checked, nothing replaced that the run did not write -------
FOREIGN = 'holds {}, not written by a run, that this run would replace; choose another folder, or pass --overwrite'


@case
def users_config_yaml_in_the_output_dir(c):
    c.user_file('config.yaml', '# my notes on the experiment\nlr: try 1e-4 next\n')
    return Expect(Pretrain.main, c.argv(c.config()), refuses_output_dir(c, re.escape(FOREIGN.format('config.yaml'))))


@case
def config_file_is_the_output_dirs_config_yaml(c):
    text = '# my VE settings, kept with the run\n' + open(c.config('VE')).read()
    config = c.user_file('config.yaml', text)
    return Expect(VE.main, c.argv(config),
                  f'^--config {re.escape(config)} is the config.yaml of --output_dir {re.escape(str(c.out))}, which '
                  f'the run writes its resolved config to; keep the config outside the output folder, or pass '
                  f'--overwrite')


@case
def users_config_yaml_kept_when_an_overwrite_run_fails_on_its_data(c):
    """--overwrite lets the run replace config.yaml, but only once it has run: a run that fails on its annotation
    file (after the folder check) has written nothing."""
    c.user_file('config.yaml', '# my notes\n')
    items = c.items('retrieval_train.json', 16)
    items[2]['image'] = 17
    ann = c.write('retrieval_train.json', items)
    return Expect(Retrieval.main, c.argv(c.config('Retrieval', train_file=[ann]), '--overwrite'),
                  f"^{re.escape(ann)} item 2: key 'image' must be str, got 17$")


@case
def config_file_in_the_output_dir_kept_when_an_overwrite_run_fails_on_its_checkpoint(c):
    config = c.user_file('config.yaml', '# NLVR, as I ran it\n' + open(c.config('NLVR')).read())
    missing = str(c.tmp / 'no_such.pth')
    return Expect(NLVR.main, c.argv(config, '--overwrite', '--checkpoint', missing),
                  f'^checkpoint file not found: {re.escape(missing)}$')


EVALUATE_INTO_RUN = ('already holds a run \\(checkpoint_00.pth, ...\\); --evaluate would add to its log.txt and '
                     'replace its config.yaml and result files: evaluate into another folder, or pass --overwrite$')


@case
def evaluate_into_a_finished_run_ve(c):
    c.finished_run('results.json')
    return Expect(VE.main, c.argv(c.config('VE'), '--evaluate', '--checkpoint', c.checkpoints['ve']),
                  refuses_output_dir(c, EVALUATE_INTO_RUN))


@case
def evaluate_into_a_finished_run_retrieval(c):
    c.finished_run('retrieval_test_metrics.json')
    return Expect(Retrieval.main, c.argv(c.config('Retrieval'), '--evaluate', '--checkpoint',
                                         c.checkpoints['training'], '--score', 'itc'),
                  refuses_output_dir(c, EVALUATE_INTO_RUN))


@case
def evaluate_into_a_finished_run_nlvr(c):
    c.finished_run('results.json')
    return Expect(NLVR.main, c.argv(c.config('NLVR'), '--evaluate', '--checkpoint', c.checkpoints['training']),
                  refuses_output_dir(c, EVALUATE_INTO_RUN))


@case
def evaluate_into_a_finished_run_vqa(c):
    c.finished_run('vqa_accuracy.json')
    return Expect(VQA.main, c.argv(c.config('VQA'), '--evaluate', '--checkpoint', c.checkpoints['training']),
                  refuses_output_dir(c, EVALUATE_INTO_RUN))


@case
def evaluate_into_a_finished_run_grounding(c):
    c.finished_run('grounding_results.json')
    return Expect(Grounding.main, c.argv(c.config('Grounding'), '--evaluate', '--checkpoint',
                                         c.checkpoints['training']),
                  refuses_output_dir(c, EVALUATE_INTO_RUN))


@case
def output_dir_holds_result_files(c):
    c.user_file('retrieval_test_metrics.json', '{"test": {"r_mean": 81.2}}\n')
    (c.out / 'result').mkdir()
    c.user_file('result/epoch0.pth', 'maps')
    return Expect(Retrieval.main, c.argv(c.config('Retrieval')),
                  refuses_output_dir(c, re.escape(FOREIGN.format('retrieval_test_metrics.json, result/'))
                                     + ' to replace them$'))


@case
def resume_from_a_checkpoint_into_a_folder_with_a_users_config(c):
    """--resume --checkpoint starts a run in a folder that holds none: its config.yaml is the user's."""
    c.user_file('config.yaml', '# mine\n')
    return Expect(Pretrain.main, c.argv(c.config(), '--resume', '--checkpoint', c.checkpoints['training']),
                  refuses_output_dir(c, re.escape(FOREIGN.format('config.yaml'))))


# Config files that would hang the loader or take gigabytes ------------------------------------------------------
def _within_seconds(c):
    assert c.elapsed < BOMB_SECONDS, f'took {c.elapsed:.1f} s'


def _bomb(levels=9, width=10) -> str:
    """Anchors that repeat each other `width` times per level: a few hundred bytes, width ** levels values."""
    items = [f'&a0 [{", ".join(["x"] * width)}]']
    items += [f'&a{i} [{", ".join([f"*a{i - 1}"] * width)}]' for i in range(1, levels)]
    return '[' + ', '.join(items) + ']'


@case
def config_yaml_alias_bomb(c):
    config = c.write('bomb.yaml', open(c.config()).read() + f'train_file: {_bomb()}\n')
    assert os.path.getsize(config) < 10_000
    return Expect(Pretrain.main, c.argv(config),
                  f'^{re.escape(config)}:\\d+:\\d+: YAML aliases expand this to more than 100000 values',
                  _within_seconds)


@case
def override_yaml_alias_bomb(c):
    config = c.config('VE')
    opt = f'test_file={_bomb()}'
    return Expect(VE.main, c.argv(config, '--opt', opt),
                  f'^--opt {re.escape(opt[:77])}\\.\\.\\.:\\d+:\\d+: YAML aliases expand this to more than 100000 '
                  f'values', _within_seconds)


@case
def config_nested_too_deep(c):
    config = c.write('deep.yaml', open(c.config('Retrieval')).read() + 'val_file: ' + '[' * 5000 + ']' * 5000 + '\n')
    return Expect(Retrieval.main, c.argv(config), f'^{re.escape(config)}:\\d+:\\d+: nested more than 32 levels deep$')


@case
def config_is_a_fifo(c):
    path = c.outside('config.yaml')
    os.mkfifo(path)  # nobody writes to it: reading it would block forever
    return Expect(Pretrain.main, c.argv(path),
                  f'^{re.escape(path)}: the config file is a FIFO \\(named pipe\\), not a regular file$',
                  _within_seconds)


@case
def config_is_a_device(c):
    return Expect(NLVR.main, c.argv('/dev/zero'),
                  '^/dev/zero: the config file is a character device, not a regular file$', _within_seconds)


@case
def config_is_a_directory(c):
    path = c.tmp / 'configs.yaml'
    path.mkdir()
    return Expect(VQA.main, c.argv(path),
                  f'^{re.escape(str(path))}: the config file is a directory, not a regular file$')


@case
def config_file_too_large(c):
    config = c.write('huge.yaml', open(c.config('Grounding')).read() + ('# ' + 'x' * 1000 + '\n') * 5000)
    return Expect(Grounding.main, c.argv(config), f'^{re.escape(config)}: the config file is larger than 4 MiB')


# Values of the right type, out of range -------------------------------------------------------------------------
@case
def queue_size_that_cannot_be_allocated(c):
    return config_case(c, 'Pretrain', Pretrain.main,
                       "key 'queue_size' must be <= 1048576 \\(larger would not fit in memory\\), got 1000000000000$",
                       queue_size=10 ** 12)


@case
def embed_dim_that_cannot_be_allocated(c):
    return config_case(c, 'Retrieval', Retrieval.main, "key 'embed_dim' must be <= 16384 .*, got 1000000000$",
                       embed_dim=10 ** 9)


@case
def queue_times_embed_dim_too_large(c):
    return config_case(c, 'Pretrain', Pretrain.main,
                       "key 'queue_size' \\(1048576\\) times 'embed_dim' \\(1024\\) is 1073741824 values per feature "
                       "queue, more than", queue_size=1 << 20, embed_dim=1024)


@case
def vision_width_not_divisible_by_heads(c):
    return config_case(c, 'VE', VE.main, "key 'vision_width' \\(32\\) is not divisible by 'vision_num_heads' \\(3\\)",
                       vision_num_heads=3)


@case
def bert_hidden_size_not_divisible_by_heads(c):
    bert = dict(TINY_BERT, hidden_size=30, num_attention_heads=4)
    return config_case(c, 'NLVR', NLVR.main,
                       "key 'bert_config.hidden_size' \\(30\\) is not divisible by 'num_attention_heads' \\(4\\)",
                       bert_config=bert)


@case
def bert_config_file_with_heads_not_dividing_the_width(c):
    bert = c.write('bert_tiny.json', dict(TINY_BERT, num_attention_heads=3))
    return config_case(c, 'NLVR_pretrain', Pretrain_nlvr.main,
                       f"bert_config {re.escape(bert)}: key 'hidden_size' \\(32\\) is not divisible by "
                       f"'num_attention_heads' \\(3\\)", bert_config=bert)


@case
def bert_fusion_layer_beyond_its_layers(c):
    return config_case(c, 'VQA', VQA.main, "key 'bert_config.fusion_layer' \\(5\\) is larger than 'num_hidden_layers' "
                                           "\\(2\\)$", bert_config=dict(TINY_BERT, fusion_layer=5))


@case
def mlm_probability_above_one(c):
    return config_case(c, 'Pretrain', Pretrain.main, "key 'mlm_probability' must be in \\[0, 1\\], got 1.5$",
                       mlm_probability=1.5)


@case
def alpha_negative(c):
    return config_case(c, 'VE', VE.main, "key 'alpha' must be in \\[0, 1\\], got -0.4$", alpha=-0.4)


@case
def momentum_above_one(c):
    return config_case(c, 'Retrieval', Retrieval.main, "key 'momentum' must be in \\[0, 1\\], got 1.5$", momentum=1.5)


@case
def itm_random_negatives_negative(c):
    return config_case(c, 'Pretrain', Pretrain.main, "key 'itm_random_negatives' must be in \\[0, 1\\], got -0.5$",
                       itm_random_negatives=-0.5)


@case
def temperature_zero(c):
    return config_case(c, 'Retrieval', Retrieval.main, "key 'temp' must be in \\(0, 1\\], got 0$", temp=0)


@case
def image_res_not_a_multiple_of_patch_size(c):
    return config_case(c, 'VQA', VQA.main, "key 'image_res' \\(20\\) is not a multiple of 'patch_size' \\(8\\): the "
                                           "border pixels would be dropped; use 16 or 24$", image_res=20)


@case
def patch_size_larger_than_image_res(c):
    return config_case(c, 'Grounding', Grounding.main, "key 'patch_size' \\(32\\) is larger than 'image_res' \\(16\\)$",
                       patch_size=32)


@case
def negative_learning_rate(c):
    return config_case(c, 'NLVR', NLVR.main, "key 'optimizer.lr' must be >= 0, got -0.0001$",
                       optimizer={'opt': 'adamW', 'lr': -1e-4, 'weight_decay': 0.02})


@case
def negative_weight_decay(c):
    return config_case(c, 'VE', VE.main, "key 'optimizer.weight_decay' must be >= 0, got -0.02$",
                       optimizer={'opt': 'adamW', 'lr': 1e-4, 'weight_decay': -0.02})


@case
def optimizer_beta_of_one(c):
    return config_case(c, 'Retrieval', Retrieval.main, "key 'optimizer.opt_betas' entry 1 must be in \\[0, 1\\), got "
                                                       "1.0$",
                       optimizer={'opt': 'adamW', 'lr': 1e-4, 'opt_betas': [0.9, 1.0]})


@case
def learning_rate_not_a_number(c):
    return config_case(c, 'VQA', VQA.main, "key 'optimizer.lr' must be int or float or null, got str 'fast'$",
                       optimizer={'opt': 'adamW', 'lr': 'fast'})


@case
def scheduler_negative_warmup_lr(c):
    from tests.toy import TINY_SCHED
    return config_case(c, 'Pretrain', Pretrain.main, "key 'schedular.warmup_lr' must be >= 0, got -1e-05$",
                       schedular=dict(TINY_SCHED, warmup_lr=-1e-5))


@case
def pretrain_batch_size_one(c):
    """Today's symptom was 'training diverged (learning rate too high?)' after a step: name the batch size."""
    return config_case(c, 'Pretrain', Pretrain.main, "key 'batch_size' must be >= 2 for pretraining \\(ITM draws the "
                                                     "negatives of each pair from the rest of the batch\\), got 1$",
                       batch_size=1)


@case
def retrieval_batch_size_one(c):
    return config_case(c, 'Retrieval', Retrieval.main, "key 'batch_size_train' must be >= 2 for retrieval training",
                       batch_size_train=1)


@case
def ta_pretrain_batch_size_two(c):
    return config_case(c, 'NLVR_pretrain', Pretrain_nlvr.main, "key 'batch_size' must be >= 3 for TA pretraining",
                       batch_size=2)


@case
def num_workers_negative_in_the_config(c):
    return config_case(c, 'Grounding', Grounding.main, "key 'num_workers' must be >= 0, got -2$", num_workers=-2)


@case
def train_file_entry_not_a_string(c):
    return config_case(c, 'Pretrain', Pretrain.main, "key 'train_file' entry 1 must be str, got int 3$",
                       train_file=[os.path.join(c.world, 'pretrain.json'), 3])


@case
def text_encoder_in_the_config_missing(c):
    missing = str(c.tmp / 'no_vocab_here')
    return config_case(c, 'VE', VE.main, f"key 'text_encoder' \\({re.escape(missing)}\\): folder not found$",
                       text_encoder=missing)


# Flags ----------------------------------------------------------------------------------------------------------
@case
def device_gpu(c):
    return flag_case(c, 'Pretrain', Pretrain.main, "--device: 'gpu' is not a device \\(use cpu, cuda or cuda:N\\)",
                     '--device', 'gpu')


@case
def device_cuda_x(c):
    return flag_case(c, 'VE', VE.main, "--device: 'cuda:x' is not a device \\(use cpu, cuda or cuda:N\\)",
                     '--device', 'cuda:x')


@case
def device_cuda_index_that_is_absent(c):
    """On a machine with one GPU (pretended), cuda:7 is refused before anything touches CUDA."""
    c.monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    c.monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    return flag_case(c, 'Retrieval', Retrieval.main, "--device: 'cuda:7': this machine has 1 CUDA device\\(s\\) "
                                                     "\\(cuda:0\\)", '--device', 'cuda:7')


@case
def num_workers_flag_negative(c):
    return flag_case(c, 'NLVR', NLVR.main, '--num_workers: must be >= 0, got -1', '--num_workers', '-1')


@case
def max_steps_per_epoch_negative(c):
    """Today: zero steps trained, and an epoch checkpoint written."""
    return flag_case(c, 'Pretrain', Pretrain.main, '--max_steps_per_epoch: must be >= 0, got -1',
                     '--max_steps_per_epoch', '-1')


@case
def save_every_steps_negative(c):
    return flag_case(c, 'VE', VE.main, '--save_every_steps: must be >= 0, got -3', '--save_every_steps', '-3')


@case
def seed_negative(c):
    return flag_case(c, 'Retrieval', Retrieval.main, '--seed: must be in \\[0, 4294967295\\], got -1', '--seed', '-1')


@case
def seed_too_large(c):
    return flag_case(c, 'NLVR', NLVR.main, '--seed: must be in \\[0, 4294967295\\], got 1099511627776',
                     '--seed', str(2 ** 40))


@case
def seed_not_an_integer(c):
    return flag_case(c, 'Grounding', Grounding.main, "--seed: must be an integer, got 'abc'", '--seed', 'abc')


@case
def k_test_flag_zero(c):
    return flag_case(c, 'Retrieval', Retrieval.main, '--k_test: must be > 0, got 0', '--k_test', '0')


@case
def unknown_flag(c):
    return Expect(VQA.main, c.argv(c.config('VQA'), '--learning_rate', '0.1'),
                  '^unrecognized arguments: --learning_rate 0.1 \\(see --help\\)$')


@case
def text_encoder_folder_missing(c):
    missing = str(c.tmp / 'vocab_missing')
    return Expect(VQA.main, c.argv(c.config('VQA'), '--text_encoder', missing),
                  f'^--text_encoder {re.escape(missing)}: folder not found$')


@case
def text_encoder_folder_without_vocab(c):
    folder = c.tmp / 'empty_vocab'
    folder.mkdir()
    (folder / 'README').write_text('the vocabulary goes here\n')
    return Expect(Grounding.main, c.argv(c.config('Grounding'), '--text_encoder', folder),
                  f'^--text_encoder {re.escape(str(folder))}: the folder holds no vocab.txt \\(nor tokenizer.json\\)$')


def _offline_with_an_empty_cache(c):
    import huggingface_hub.constants
    c.monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    c.monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', c.outside('empty_hf_cache'))


@case
def text_encoder_hub_name_offline_and_not_cached(c):
    """transformers would build a tokenizer with an empty vocabulary (5 special tokens) here and train on it."""
    _offline_with_an_empty_cache(c)
    return Expect(Pretrain.main, c.argv(c.config(), '--text_encoder', 'no-such-bert-xyz'),
                  '^--text_encoder no-such-bert-xyz: no such folder, and not in the Hugging Face cache')


@case
def text_encoder_default_offline_and_not_cached(c):
    """A config without text_encoder (as the original ones) means bert-base-uncased, from the hub."""
    _offline_with_an_empty_cache(c)
    config = c.config('NLVR')
    values = utils.load_config(config)
    del values['text_encoder']
    utils.save_config(values, config)
    return Expect(NLVR.main, c.argv(config),
                  f"^{re.escape(config)}: key 'text_encoder' \\(bert-base-uncased, the default\\): no such folder, "
                  f"and not in the Hugging Face cache")


@case
def vqa_test_annotations_missing(c):
    missing = str(c.tmp / 'v2_mscoco_test_annotations.json')
    questions = os.path.join(c.world, 'vqa_test_questions.json')
    return flag_case(c, 'VQA', VQA.main, f'--test_annotations: file not found: {re.escape(missing)}',
                     '--test_annotations', missing, '--test_questions', questions)


@case
def vqa_test_annotations_without_questions(c):
    annotations = os.path.join(c.world, 'vqa_test_annotations.json')
    return Expect(VQA.main, c.argv(c.config('VQA'), '--test_annotations', annotations),
                  '^give both --test_annotations and --test_questions \\(official VQA files\\), or neither$')


# ----------------------------------------------------------------------------------------------------------------
# Running a case (as tests/test_bad_inputs.py does, plus the time it took)
# ----------------------------------------------------------------------------------------------------------------
def test_catalogue_size():
    assert len(CASES) >= 30


@pytest.mark.parametrize('make_case', CASES, ids=lambda f: f.__name__)
def test_bad_input(make_case, ctx, capsys):
    run_case(make_case.__name__, make_case(ctx), ctx, capsys, no_new_config=True)


# ----------------------------------------------------------------------------------------------------------------
# What must keep working
# ----------------------------------------------------------------------------------------------------------------
def test_released_configs_still_load():
    paths = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml')) +
                   glob.glob(os.path.join(ROOT, 'configs', 'toy', '*.yaml')))
    assert len(paths) == 15
    cwd = os.getcwd()
    os.chdir(ROOT)  # their bert_config paths are relative to the repository, as the scripts are run
    try:
        for path in paths:
            config = utils.load_config(os.path.relpath(path, ROOT))
            assert config['optimizer']['lr'] > 0 and config['image_res'] % config.get('patch_size', 16) == 0
    finally:
        os.chdir(cwd)


def test_a_failed_run_leaves_no_config_and_no_folder(ctx, capsys):
    """A run that fails on its data writes nothing: not config.yaml, not even the output folder it created."""
    out = ctx.tmp / 'fresh' / 'run'
    _, argv = ctx.pretrain_with(lambda items: items[BAD_ITEM].pop('caption'))
    argv[argv.index('--output_dir') + 1] = str(out)
    assert utils.run_cli(Pretrain.main, argv) == utils.EXIT_USER_ERROR
    assert "missing key 'caption'" in capsys.readouterr().err
    assert not (ctx.tmp / 'fresh').exists()


def test_config_yaml_written_with_the_first_output_and_a_killed_starts_copy_accepted(ctx, tmp_path):
    """A run writes config.yaml (the resolved config) with its first output. A folder holding only a config.yaml with
    exactly that content (a start killed between the two writes) is not refused: nothing in it would change."""
    config = ctx.config('VE')
    first = tmp_path / 'first'
    assert utils.run_cli(VE.main, run_args(config, first, '--max_steps_per_epoch', 1)) == 0
    written = (first / 'config.yaml').read_bytes()
    assert utils.load_config(str(first / 'config.yaml'))['batch_size_train'] == 4
    again = tmp_path / 'again'
    again.mkdir()
    (again / 'config.yaml').write_bytes(written)
    assert utils.run_cli(VE.main, run_args(config, again, '--max_steps_per_epoch', 1)) == 0
    assert (again / 'config.yaml').read_bytes() == written and (again / 'log.txt').is_file()


def test_overwrite_replaces_the_users_config_once_the_run_ran(ctx):
    ctx.user_file('config.yaml', '# mine\n')
    argv = ctx.argv(ctx.config(), '--overwrite', '--max_steps_per_epoch', '1')
    assert utils.run_cli(Pretrain.main, argv) == 0
    assert utils.load_config(str(ctx.out / 'config.yaml'))['batch_size'] == 4
    assert (ctx.out / 'notes.txt').is_file()


def test_evaluate_into_a_fresh_folder_writes_its_config(ctx, tmp_path):
    out = tmp_path / 'eval'
    argv = run_args(ctx.config('VE'), out, '--evaluate', '--checkpoint', ctx.checkpoints['ve'])
    assert utils.run_cli(VE.main, argv) == 0
    assert sorted(os.listdir(out)) == ['config.yaml', 'log.txt', 'results.json']


def test_flag_errors_are_one_line_as_a_program(ctx):
    """`python VE.py --seed abc`: argparse's error as one line on stderr, exit status 2, no usage block."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'VE.py'), *ctx.argv(ctx.config('VE'), '--seed', 'abc')],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: argument --seed: must be an integer, got 'abc' (see --help)"]
    assert not (ctx.out / 'config.yaml').exists()


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        Pretrain.main(['--help'])
    assert e.value.code == 0 and '--max_steps_per_epoch' in capsys.readouterr().out


def test_every_range_is_declared_in_the_schema():
    """The ranges live beside the types (utils.Spec): every size is capped, every share is in [0, 1]."""
    sizes = ['image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads', 'embed_dim', 'queue_size',
             'batch_size', 'batch_size_train', 'batch_size_test', 'k_test', 'max_words', 'itm_batch_size']
    for key in sizes:
        spec = utils.CONFIG_SCHEMA[key]
        assert spec.lo == 0 and spec.lo_open and spec.cap is not None, key
    for key in ('mlm_probability', 'alpha', 'momentum', 'itm_random_negatives'):
        assert utils.CONFIG_SCHEMA[key].range_text() == 'in [0, 1]'
    assert optim.OPTIMIZER_SCHEMA['opt_betas'].items.range_text() == 'in [0, 1)'
    assert optim.OPTIMIZER_KEYS == set(optim.OPTIMIZER_SCHEMA)
    assert scheduler.SCHEDULER_KEYS == set(scheduler.SCHEDULER_SCHEMA)
