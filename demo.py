"""`make demo`: the whole ALBEF pipeline on the embedded toy world, on a laptop CPU.

Generates the toy world and the supervised ViT it starts from (each only if missing), pretrains a tiny ALBEF,
fine-tunes and evaluates retrieval, and writes a Grad-CAM picture of what the model looks at for a caption. Each step is the real script, run as a user would;
the commands are printed so they can be re-run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(cmd: list[str]) -> None:
    print('\n$ ' + ' '.join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f'(done in {time.time() - start:.0f} s)', flush=True)


def last_json_line(path: str, key: str) -> dict:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip().startswith('{')]
    return [r for r in records if key in r][-1]


def pick_example(toy_dir: str) -> tuple[str, str, list]:
    """A test image with a referring expression from the toy world's grounding annotations."""
    with open(os.path.join(toy_dir, 'refcoco+_test.json')) as f:
        item = json.load(f)[0]
    return os.path.join(toy_dir, 'images', item['image']), item['text'], []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--toy-dir', default='data/toyworld')
    parser.add_argument('--out', default='output/toy_demo')
    parser.add_argument('--seed', default=0, type=int, help='toy world seed')
    args = parser.parse_args(argv)
    py = sys.executable
    out = args.out
    if os.path.isdir(out):
        shutil.rmtree(out)  # the demo always starts over; real runs are protected by --resume/--overwrite
    total = time.time()

    run([py, '-m', 'dataset.toyworld', '--out', args.toy_dir, '--seed', str(args.seed)])
    # The image tower ALBEF starts from (DeiT, trained with ImageNet labels), made the toy world's way.
    run([py, '-m', 'dataset.toyworld_vit', '--world', args.toy_dir, '--config', 'configs/toy/Pretrain.yaml'])
    run([py, 'Pretrain.py', '--config', 'configs/toy/Pretrain.yaml', '--output_dir', f'{out}/pretrain'])
    pre = last_json_line(f'{out}/pretrain/log.txt', 'train_loss_ita')
    # A short fine-tune (100 steps per epoch) keeps the demo within minutes; drop the flag for the full recipe.
    run([py, 'Retrieval.py', '--config', 'configs/toy/Retrieval.yaml', '--output_dir', f'{out}/retrieval',
         '--checkpoint', f'{out}/pretrain/checkpoint_last.pth', '--max_steps_per_epoch', '100'])
    with open(f'{out}/retrieval/retrieval_test_metrics.json') as f:
        metrics = json.load(f)['test']
    image, caption, _ = pick_example(args.toy_dir)
    run([py, 'Predict.py', '--config', 'configs/toy/Grounding.yaml', '--checkpoint',
         f'{out}/retrieval/checkpoint_best.pth', '--image', image, '--caption', caption,
         '--out', f'{out}/gradcam.png'])

    print('\n== Toy-world demo results ==')
    print(f"pretraining, last epoch: loss_ita {pre['train_loss_ita']:.3f}  loss_itm {pre['train_loss_itm']:.3f}  "
          f"loss_mlm {pre['train_loss_mlm']:.3f}")
    print('retrieval (test split):')
    print('| metric | value |\n| --- | --- |')
    for key in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean'):
        if key in metrics:
            print(f'| {key} | {metrics[key]:.2f} |')
    # Many toy captions are true of several images: say how far R@1 could go on this world at all.
    from dataset.toyworld import retrieval_ceiling
    best = retrieval_ceiling(args.toy_dir, 'test')
    print(f"best possible R@1 on this world's test split (any model): txt_r1 {best['txt_r1']:.2f}  "
          f"img_r1 {best['img_r1']:.2f}")
    print(f'Grad-CAM for "{caption}" on {os.path.basename(image)}: {out}/gradcam.png')
    print(f'total time {time.time() - total:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
