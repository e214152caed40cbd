"""Crash safety and distributed consistency, end to end with real processes.

* Kill test (benchmarks/kill_test.py, reduced: 3 kills of a tiny pretraining, 2 of a tiny VE fine-tuning; the
  script's default is 20 each): SIGKILL at random moments, resume each time, final state bit-identical to an
  uninterrupted run, every checkpoint present after a kill loadable, partial temp files removed on restart.
* Distributed consistency: a 2-process gloo run with batch b per rank against a 1-process run with batch 2b.
  VE fine-tuning: every loss term is per example (cross-entropy, and distillation against the momentum model's
  prediction for the same example), the forward draws no random numbers (no dropout in the tiny model), there is
  no BatchNorm (ALBEF normalises with LayerNorm, per example), and DDP averages the ranks' gradients, i.e. takes
  the gradient of the mean over all 2b examples. So the losses and the weights agree up to float summation order.
  Pretraining: the ranks see exactly the 1-process batch between them, and the feature queues hold the same
  momentum features after the step, but the three losses differ by design, because ALBEF computes them per
  rank: ITA contrasts each rank's b images with its own b texts (b - 1 in-batch negatives, not 2b - 1) plus the
  shared queue; ITM draws its hard negatives from the rank's own batch with torch.multinomial on the rank's RNG
  stream (seeded seed + rank); MLM draws its mask positions from that stream too, and averages over each rank's
  own masked tokens. The test checks what agrees and reports the loss values that differ.
"""
import json
import os

import pytest
import torch

import Pretrain
import utils
import VE
from benchmarks.kill_test import run_kill_test, summary
from tests.toy import MINI_WORLD_SIZES, generate_world, launch_ranks, mini_config


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('hardening') / 'world'), 3, **MINI_WORLD_SIZES)


# ----------------------------------------------------------------------------------------------------------------
# Kill test
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('task,kills', [('pretrain', 3), ('ve', 2)])
def test_kill_and_resume_is_bit_identical(world, tmp_path, task, kills):
    report = run_kill_test(task, world, str(tmp_path), trials=kills, seed=0)
    print(summary(report))
    problems = [f'kill {t.number}: {p}' for t in report.trials + [report.final] for p in t.problems]
    assert not problems
    assert report.kills == kills, 'a run ended before its kill'
    assert report.completed and report.identical, report.differences
    assert report.partials_seen >= 1 and report.partials_cleaned == report.partials_seen
    assert report.ok


# ----------------------------------------------------------------------------------------------------------------
# Distributed consistency
# ----------------------------------------------------------------------------------------------------------------
def two_and_one_process_runs(world, tmp_path, name, main, per_rank: dict, single: dict, extra=()):
    """Run `name` with 2 gloo ranks (config `per_rank`) and, meanwhile, in this process with `single`; returns the
    two output folders."""
    common = ['--device', 'cpu', '--seed', '0', *extra]
    two, one = tmp_path / 'two', tmp_path / 'one'
    ranks = launch_ranks(f'{name}.py', ['--config', mini_config(name, world, tmp_path / 'two.yaml', **per_rank),
                                        '--output_dir', two, *common])
    try:
        config = mini_config(name, world, tmp_path / 'one.yaml', **single)
        assert utils.run_cli(main, ['--config', config, '--output_dir', str(one), '--no-distributed', *common]) == 0
        outputs = [p.communicate(timeout=300) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, (_, err)) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 0, f'rank {rank}: {err[-3000:]}'
    return str(two), str(one)


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


def model_state(out):
    return torch.load(os.path.join(out, 'checkpoint_last.pth'), weights_only=True)['model']


def test_ve_two_ranks_equal_one_process_with_the_doubled_batch(world, tmp_path):
    two, one = two_and_one_process_runs(world, tmp_path, 'VE', VE.main, {'batch_size_train': 4},
                                        {'batch_size_train': 8})
    (rec2,), (rec1,) = log(two)[:1], log(one)[:1]
    # train_loss: the 2-rank value is the mean over ranks and steps (synchronised meters), as the 1-rank mean.
    assert rec2['train_loss'] == pytest.approx(rec1['train_loss'], rel=1e-5)
    assert (rec2['val_acc'], rec2['test_acc']) == (rec1['val_acc'], rec1['test_acc'])
    a, b = model_state(two), model_state(one)
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-5, f'weights differ by up to {worst:.2e} after a 9-step epoch'


def test_pretraining_two_ranks_share_the_batch_and_queue_but_not_the_losses(world, tmp_path):
    b = 4
    two, one = two_and_one_process_runs(world, tmp_path, 'Pretrain', Pretrain.main,
                                        {'batch_size': b, 'queue_size': 16}, {'batch_size': 2 * b, 'queue_size': 16},
                                        extra=['--max_steps_per_epoch', '1'])
    a, s = model_state(two), model_state(one)
    assert int(a['queue_ptr']) == int(s['queue_ptr']) == 2 * b
    for key in ('image_queue', 'text_queue'):
        # The gather puts rank 0's b features, then rank 1's; each rank took every other item of the 1-process
        # batch (DistributedSampler: rank r gets items r, r + 2, ... of the same shuffled order). Momentum
        # features at step 0 come from the initial weights, identical in both runs.
        gathered, single = a[key][:, :2 * b], s[key][:, :2 * b]
        torch.testing.assert_close(gathered[:, :b], single[:, 0::2], rtol=0, atol=1e-6)
        torch.testing.assert_close(gathered[:, b:], single[:, 1::2], rtol=0, atol=1e-6)
        torch.testing.assert_close(a[key][:, 2 * b:], s[key][:, 2 * b:], rtol=0, atol=0)  # untouched entries
    rec2, rec1 = log(two)[0], log(one)[0]
    for term in ('train_loss_ita', 'train_loss_itm', 'train_loss_mlm'):
        assert torch.isfinite(torch.tensor([rec2[term], rec1[term]])).all()
        print(f'{term}: 2 ranks x {b}: {rec2[term]:.5f}   1 process x {2 * b}: {rec1[term]:.5f}')
