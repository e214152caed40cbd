"""Toy pretraining learns (issue: Pretrain.py, learning measured): the shared toy pretraining (tests/conftest.py,
configs/toy/Pretrain.yaml on a freshly generated world, TOY_SEED, default 1) makes each of its three losses fall
clearly, and its ITC features alone retrieve far above chance on the toy test split (zero-shot, no fine-tuning).

Measured on the seed-1 world (1200 training images, 20 epochs, 740 steps, 5.6 min on 2 cores): epoch means
ITC 5.38 -> 3.34, ITM 0.641 -> 0.565, MLM 4.58 -> 3.42; zero-shot test TR@1 7.3 %, IR@1 11.1 %, R@10 35.3 / 53.7 %
(chance: 1 in 150 images, about 5 in 750 captions: 0.67 % at R@1, 6.7 % at R@10). The assertions ask for about
half of each measured effect.
"""
import json
import os

import pytest

CHANCE_R1 = 100 / 150  # percent: one right image of the 150 test images (and ~5 right captions of 750)


def _epoch_means(log_path: str) -> list[dict]:
    with open(log_path) as f:
        return [json.loads(line) for line in f if 'train_loss_ita' in line]


@pytest.mark.slow
def test_toy_pretraining_losses_fall(toy_pretrain):
    epochs = _epoch_means(os.path.join(toy_pretrain, 'log.txt'))
    first, last = epochs[0], epochs[-1]
    summary = {k: (round(first[k], 3), round(last[k], 3)) for k in ('train_loss_ita', 'train_loss_itm',
                                                                     'train_loss_mlm')}
    print(f'toy pretraining, {len(epochs)} epochs in {last["time_s"]:.0f} s, first -> last epoch mean: {summary}')
    assert last['train_loss_ita'] < first['train_loss_ita'] - 1.0
    assert last['train_loss_mlm'] < first['train_loss_mlm'] - 0.5
    # ITM starts at its prior (~0.64 for 1 positive : 2 negatives) and is the slowest to leave it from scratch.
    assert last['train_loss_itm'] < first['train_loss_itm'] - 0.04


@pytest.mark.slow
def test_toy_pretraining_zero_shot_retrieval_far_above_chance(toy_world, toy_pretrain, tmp_path):
    import Retrieval
    from tests.toy import make_toy_config
    cfg = make_toy_config('Retrieval', toy_world, str(tmp_path / 'Retrieval.yaml'))
    out = tmp_path / 'zero_shot'
    Retrieval.main(['--config', cfg, '--output_dir', str(out), '--device', 'cpu', '--no-distributed', '--evaluate',
                    '--score', 'itc', '--checkpoint', os.path.join(toy_pretrain, 'checkpoint_last.pth')])
    test = json.loads((out / 'retrieval_test_metrics.json').read_text())['test']
    print(f"toy zero-shot ITC retrieval: TR@1 {test['txt_r1']:.1f} IR@1 {test['img_r1']:.1f} "
          f"TR@10 {test['txt_r10']:.1f} IR@10 {test['img_r10']:.1f}")
    assert test['txt_r1'] >= 5 * CHANCE_R1 and test['img_r1'] >= 5 * CHANCE_R1
    assert test['txt_r10'] >= 3 * 10 * CHANCE_R1 and test['img_r10'] >= 3 * 10 * CHANCE_R1
