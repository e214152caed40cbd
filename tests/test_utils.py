"""utils/: config validation, distributed helpers at world size 1, metric logging, safe writes, CLI plumbing."""
import argparse
import glob
import json
import os
import platform
import sys

import pytest
import torch

# The owners of the config's blocks and model checks declare them when imported.
import dataset  # noqa: F401
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.yaml')))


def write(tmp_path, text, name='c.yaml'):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_original_configs_load_with_float_scalars(path):
    cfg = utils.load_config(path)
    assert isinstance(cfg['optimizer']['lr'], float)  # 1e-4 must be a float (YAML 1.2), not a string
    assert cfg['schedular']['sched'] == 'cosine'


def test_original_config_values_are_preserved():
    cfg = utils.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'Retrieval_coco.yaml'))
    assert cfg['k_test'] == 256 and cfg['image_res'] == 384 and cfg['queue_size'] == 65536
    assert cfg['schedular'] == {'sched': 'cosine', 'lr': 1e-5, 'epochs': 5, 'min_lr': 1e-6, 'decay_rate': 1,
                                'warmup_lr': 1e-5, 'warmup_epochs': 1, 'cooldown_epochs': 0}


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = write(tmp_path, 'image_res: 64\nbatch_szie: 4\n')
    with pytest.raises(utils.ConfigError, match=r"c\.yaml: unknown key 'batch_szie' \(did you mean 'batch_size'\?\)"):
        utils.load_config(p)


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, 'optimizer: {opt: adamw, lr: 0.1, weight_decya: 0.1}\n')
    with pytest.raises(utils.ConfigError, match="unknown key 'optimizer.weight_decya'"):
        utils.load_config(p)


def test_wrong_type_and_bool_not_int(tmp_path):
    with pytest.raises(utils.ConfigError, match="key 'image_res' must be int, got str"):
        utils.load_config(write(tmp_path, "image_res: '64'\n"))
    with pytest.raises(utils.ConfigError, match="key 'image_res' must be int, got bool"):
        utils.load_config(write(tmp_path, 'image_res: true\n'))


def test_non_positive_size(tmp_path):
    with pytest.raises(utils.ConfigError, match="key 'batch_size' must be > 0, got 0"):
        utils.load_config(write(tmp_path, 'batch_size: 0\n'))
    with pytest.raises(utils.ConfigError, match="key 'queue_size' must be > 0"):
        utils.load_config(write(tmp_path, 'queue_size: -4\n'))


@pytest.mark.parametrize('key', ['momentum', 'alpha', 'mlm_probability', 'itm_random_negatives'])
def test_shares_outside_unit_interval(tmp_path, key):
    with pytest.raises(utils.ConfigError, match=f"key '{key}' must be in \\[0, 1\\], got 1.5"):
        utils.load_config(write(tmp_path, f'{key}: 1.5\n'))
    assert utils.load_config(write(tmp_path, f'{key}: 0.5\n'))[key] == 0.5


def test_queue_smaller_than_batch(tmp_path):
    with pytest.raises(utils.ConfigError, match=r"'queue_size' \(8\) is smaller than 'batch_size' \(16\)"):
        utils.load_config(write(tmp_path, 'queue_size: 8\nbatch_size: 16\n'))


def test_missing_required_key(tmp_path):
    with pytest.raises(utils.ConfigError, match="missing required key 'train_file'"):
        utils.load_config(write(tmp_path, 'image_res: 64\n'), required=['train_file'])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(utils.ConfigError, match='config file not found: .*nope.yaml'):
        utils.load_config(str(tmp_path / 'nope.yaml'))
    with pytest.raises(utils.ConfigError, match=r'c\.yaml:2:\d+: cannot parse YAML'):
        utils.load_config(write(tmp_path, 'image_res: 64\nbatch_size: 4: 5\n'))
    with pytest.raises(utils.ConfigError, match='top level must be a mapping'):
        utils.load_config(write(tmp_path, '- 1\n- 2\n'))


def test_yaml_is_safe(tmp_path):
    # A python object tag must be refused by the safe loader, never constructed.
    p = write(tmp_path, 'image_res: !!python/object/apply:os.system ["echo pwned"]\n')
    with pytest.raises(utils.ConfigError, match='cannot parse YAML'):
        utils.load_config(p)


def test_overrides_and_scheduler_spelling(tmp_path):
    p = write(tmp_path, 'batch_size: 4\nscheduler: {sched: cosine, epochs: 2}\n')
    key, value = utils.parse_override('batch_size=8')
    cfg = utils.load_config(p, overrides={key: value})
    assert cfg['batch_size'] == 8 and cfg['scheduler']['epochs'] == 2
    with pytest.raises(utils.ConfigError, match='--opt expects key=value'):
        utils.parse_override('batch_size')


def test_save_config_round_trip(tmp_path):
    cfg = {'image_res': 64, 'optimizer': {'opt': 'adamW', 'lr': 1e-4}, 'train_file': ['a.json']}
    utils.save_config(cfg, str(tmp_path / 'config.yaml'))
    assert utils.load_config(str(tmp_path / 'config.yaml')) == cfg


def test_world_size_one_helpers():
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert utils.all_gather_object({'a': 1}) == [{'a': 1}]
    utils.barrier()  # must not raise without a process group


def test_dist_timeout_flag_reaches_the_process_group(monkeypatch):
    """--dist_timeout bounds how long a rank waits for peers that never start (default 30 min as torch's)."""
    import datetime
    seen = {}
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, 'barrier', lambda: None)
    monkeypatch.setattr(utils.distributed, 'setup_for_distributed', lambda is_master: None)
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    parser = utils.get_parent_parser('c.yaml', 'out')
    args = parser.parse_args(['--device', 'cpu', '--dist_timeout', '45'])
    utils.init_distributed_mode(args)
    assert seen['timeout'] == datetime.timedelta(seconds=45) and seen['backend'] == 'gloo' and seen['rank'] == 1
    assert parser.parse_args([]).dist_timeout == 1800
    with pytest.raises(SystemExit):
        parser.parse_args(['--dist_timeout', '0'])


def test_init_distributed_mode_single_process(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(distributed=True, device='cpu', dist_url='env://')
    utils.init_distributed_mode(args)
    assert args.distributed is False and args.rank == 0 and args.world_size == 1
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    args = argparse.Namespace(distributed=True, device='cpu', dist_url='env://')
    utils.init_distributed_mode(args)  # world size 1 from a launcher: no process group needed
    assert args.distributed is False
    args = argparse.Namespace(distributed=False, device='cpu')
    utils.init_distributed_mode(args)
    assert args.distributed is False


def test_parent_parser_flags():
    parser = argparse.ArgumentParser(parents=[utils.get_parent_parser('c.yaml', 'out')])
    a = parser.parse_args(['--local-rank=3', '--no-distributed', '--resume'])
    assert a.local_rank == 3 and a.distributed is False and a.resume is True and a.config == 'c.yaml'
    a = parser.parse_args(['--local_rank', '1', '--opt', 'batch_size=2', '--opt', 'alpha=0'])
    assert a.local_rank == 1 and a.distributed is True and a.opt == ['batch_size=2', 'alpha=0']


def test_smoothed_value_and_metric_logger(capsys):
    v = utils.SmoothedValue(window_size=2)
    for x in (1.0, 2.0, 6.0):
        v.update(x)
    assert v.median == 4.0 and v.avg == 4.0 and v.global_avg == 3.0 and v.max == 6.0 and v.value == 6.0
    logger = utils.MetricLogger()
    out = []
    for i in logger.log_every(range(5), 2, 'Hdr'):
        logger.update(loss=torch.tensor(float(i)), lr=0.1)
        out.append(i)
    assert out == list(range(5))
    assert logger.averages() == {'loss': 2.0, 'lr': pytest.approx(0.1)}
    text = capsys.readouterr().out
    assert 'Hdr  [0/5]' in text and '[4/5]' in text and 'eta: ' in text and 'Hdr Total time' in text


def test_atomic_save_and_partial_cleanup(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    utils.atomic_save({'a': torch.ones(2)}, path)
    assert torch.load(path, weights_only=True)['a'].sum() == 2
    (tmp_path / ('ckpt.pth.abc' + utils.TMP_SUFFIX)).write_bytes(b'partial')

    class Boom:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError):
        utils.atomic_save({'a': Boom()}, path)
    assert torch.load(path, weights_only=True)['a'].sum() == 2  # the earlier file survives a failed write
    assert utils.remove_partial_files(str(tmp_path)) == ['ckpt.pth.abc' + utils.TMP_SUFFIX]
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth']


def test_prepare_output_dir_refuses_other_run(tmp_path):
    out = tmp_path / 'run'
    utils.prepare_output_dir(str(out), resume=False, overwrite=False)
    (out / 'checkpoint_00.pth').write_bytes(b'x')
    with pytest.raises(utils.UserError, match='already holds a run .*--resume.*--overwrite'):
        utils.prepare_output_dir(str(out), resume=False, overwrite=False)
    utils.prepare_output_dir(str(out), resume=True, overwrite=False)
    utils.prepare_output_dir(str(out), resume=False, overwrite=True)


def test_prepare_output_dir_not_writable(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(utils.UserError, match='cannot create it'):
        utils.prepare_output_dir(str(blocker / 'sub'), resume=False, overwrite=False)


def test_append_json_line(tmp_path):
    p = str(tmp_path / 'log.txt')
    utils.append_json_line(p, {'epoch': 0, 'loss': 1.5})
    utils.append_json_line(p, {'epoch': 1, 'loss': 1.0})
    assert [json.loads(line)['epoch'] for line in open(p)] == [0, 1]


def test_run_cli_turns_user_errors_into_exit_2(capsys):
    def main(argv):
        raise utils.ConfigError('x.yaml: unknown key foo')
    assert utils.run_cli(main, []) == 2
    assert capsys.readouterr().err.strip() == 'error: x.yaml: unknown key foo'
    with pytest.raises(utils.ConfigError):
        utils.run_cli(main, ['--debug'])


_ALLOCATOR_PROBE = '''
import sys, time, torch, utils
torch.set_num_threads(1)
applied = utils.tune_memory_allocator()
def fresh_fill_ms(rounds=12):
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        torch.empty(64 * 2 ** 20 // 4).fill_(1.)  # 64 MB: always a fresh mmap under glibc's defaults
        best = min(best, time.perf_counter() - start)
    return best * 1e3
print(applied, fresh_fill_ms())
'''


def _allocator_probe(tuning: str) -> tuple[bool, float]:
    import subprocess
    import sys
    env = {**os.environ, utils.MALLOC_TUNING_ENV: tuning}
    out = subprocess.run([sys.executable, '-c', _ALLOCATOR_PROBE], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
    applied, ms = out.split()
    return applied == 'True', float(ms)


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_malloc_tuning_reuses_large_blocks_and_can_be_turned_off():
    applied, tuned_ms = _allocator_probe('1')
    not_applied, default_ms = _allocator_probe('0')
    assert applied and not not_applied
    # Filling a reused 64 MB block skips the page faults a fresh mapping takes (~4x faster on the reference CPU).
    assert tuned_ms < 0.7 * default_ms, (tuned_ms, default_ms)


def test_sigterm_outside_training_is_one_line(capsys):
    """SIGTERM at start-up or during an evaluation (no training loop installed its own handler): one line and the
    shell's status for SIGTERM, and the handler that was there before is back afterwards."""
    import signal
    import time
    before = signal.getsignal(signal.SIGTERM)

    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this

    with pytest.raises(SystemExit) as exc:
        utils.run_cli(main, [])
    assert exc.value.code == utils.EXIT_TERMINATED == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: stopped by SIGTERM')
    assert signal.getsignal(signal.SIGTERM) is before


def test_failed_write_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A write that fails for the disk's sake (here: ENOSPC from fsync) names the file, leaves the old content and
    no temp file behind; log lines are all or nothing."""
    import errno
    target = tmp_path / 'results.json'
    target.write_text('old')
    log = tmp_path / 'log.txt'
    utils.append_json_line(str(log), {'epoch': 0})

    def full(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(utils.WriteError, match=r'cannot write .*results.json: no space left on the device \(ENOSPC\)'):
        utils.atomic_write_text(str(target), 'new')
    with pytest.raises(utils.WriteError, match='log.txt'):
        utils.append_json_line(str(log), {'epoch': 1})
    assert target.read_text() == 'old' and sorted(os.listdir(tmp_path)) == ['log.txt', 'results.json']
    assert log.read_text() == '{"epoch": 0}\n'


def test_removed_knobs_are_ordinary_config_errors(tmp_path):
    """`patch_embed` and `augment.hflip: swap_sides` were tried and removed: a config naming them is refused."""
    with pytest.raises(utils.ConfigError, match=r"c.yaml: unknown key 'patch_embed'$"):
        utils.load_config(write(tmp_path, 'patch_embed: conv\n'))
    with pytest.raises(utils.ConfigError, match=r"key 'augment.hflip' must be bool, got str 'swap_sides'$"):
        utils.load_config(write(tmp_path, 'augment: {hflip: swap_sides}\n'))


def test_each_block_is_declared_by_its_owner():
    """The block schemas live with the code that reads them and reach validate_config through the registry."""
    from dataset.transforms import AUGMENT_SCHEMA
    blocks = utils.registered_blocks()
    assert blocks['augment'] is not AUGMENT_SCHEMA and blocks['augment'] == AUGMENT_SCHEMA
    assert blocks['optimizer'] == optim.OPTIMIZER_SCHEMA
    assert blocks['schedular'] == blocks['scheduler'] == scheduler.SCHEDULER_SCHEMA
    with pytest.raises(utils.ConfigError, match=r"<config>: key 'grad_checkpointing' entries must be 'vision' or "
                                                r"'text', got \['cnn'\]"):
        utils.validate_config({'grad_checkpointing': ['vision', 'cnn']})
    with pytest.raises(KeyError):
        utils.register_block('no_such_key', {})


def test_autocast_contexts():
    import contextlib
    assert isinstance(utils.autocast(torch.device('cpu'), 'fp32'), contextlib.nullcontext)
    with utils.autocast(torch.device('cpu'), 'bf16'):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(utils.UserError, match='--precision fp16 needs a CUDA device'):
        utils.autocast(torch.device('cpu'), 'fp16')
