"""Peak memory of one training step per task at full size (ViT-B/16 + BERT-base), per sample and fixed, at 256
and 384 px, with and without gradient checkpointing; and the largest batch that would fit on 24 / 40 / 80 GB.

    python -m benchmarks.memory_table                                   # every task, 256 and 384 px, fp32
    python -m benchmarks.memory_table --tasks ve --res 384 --batches 2 6 --out output/memory.json

Each (task, resolution, checkpointing) runs in its own process (peak RSS is per process): the task's model built
from its released config (configs/<Task>.yaml: queue sizes, distillation) at that resolution, fused AdamW, two
training steps (forward, backward, optimizer step) at each of the two `--batches` sizes, smaller first. Per
sample = the peak's growth between the two batch sizes divided by their difference; fixed = what is left at batch 0 (weights, momentum
copies, gradients, AdamW state, queues, the Python and torch runtime). The batch that fits a card of C GB is
(C - fixed) / per sample: an estimate from CPU peaks, not a GPU measurement (a GPU adds its CUDA context, about
0.5 GB, and keeps the caching allocator's reserve; fp32 weights and optimizer state take the same room there).
Grounding trains the retrieval model, so its rows are Retrieval's. A task that needs more items a batch than the
smaller size (ITM negatives: 2; text assignment: 3) has both sizes moved up by the same amount.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = {  # task -> (config file, model name)
    'pretrain': ('Pretrain.yaml', 'pretrain'),
    'retrieval': ('Retrieval_coco.yaml', 'retrieval'),
    'vqa': ('VQA.yaml', 'vqa'),
    'nlvr_pretrain': ('NLVR_pretrain.yaml', 'pretrain_nlvr'),
    'nlvr': ('NLVR.yaml', 'nlvr'),
    've': ('VE.yaml', 've'),
}
TEXT_LEN, QUESTION_LEN, ANSWER_LEN, ANSWERS_PER_QUESTION = 30, 15, 6, 2
CARDS_GB = (24, 40, 80)
# ITM negatives come from other items of the batch; text assignment's "neither" needs two other images.
MIN_BATCH = {'pretrain': 2, 'retrieval': 2, 'nlvr_pretrain': 3}


def build_inputs(task: str, batch: int, image_res: int, vocab: int):
    """Random inputs of one training batch for `task`, as its script hands them to the model."""
    import torch
    image = torch.randn(batch, 3, image_res, image_res)

    def text(n, length):
        ids = torch.randint(min(1000, vocab // 2), vocab, (n, length))  # past the special ids
        ids[:, 0] = 101 if vocab > 101 else 2
        return ids, torch.ones_like(ids)

    ids, mask = text(batch, TEXT_LEN)
    if task == 'pretrain':
        return (image, ids, mask), {'alpha': 0.4}
    if task == 'retrieval':
        return (image, ids, mask, torch.arange(batch)), {'alpha': 0.4}
    if task == 'nlvr_pretrain':
        return (image, ids, mask), {}
    if task == 'nlvr':  # both images of each pair in one tensor
        images = torch.randn(2 * batch, 3, image_res, image_res)
        return (images, ids, mask, torch.randint(0, 2, (batch,))), {'alpha': 0.4}
    if task == 've':
        return (image, ids, mask, torch.randint(0, 3, (batch,))), {'alpha': 0.4}
    if task == 'vqa':
        q_ids, q_mask = text(batch, QUESTION_LEN)
        a_ids, a_mask = text(batch * ANSWERS_PER_QUESTION, ANSWER_LEN)
        weights = torch.full((batch * ANSWERS_PER_QUESTION,), 1. / ANSWERS_PER_QUESTION)
        return (image, q_ids, q_mask, a_ids, a_mask, weights, [ANSWERS_PER_QUESTION] * batch), {'alpha': 0.4}
    raise ValueError(task)


def measure_one(task: str, image_res: int, batches: list[int], grad_checkpointing: bool, precision: str,
                threads: int) -> dict:
    """Peak RSS (MB) of this process after two training steps of `task` at each batch size, smallest first.

    Two steps each: from the second step on, the AdamW state made by the first is alive during the forward and
    backward passes, as in every later step. Peak RSS only grows, so each larger batch's peak is its own.
    """
    import torch
    import models
    import utils
    from optim import create_optimizer
    from benchmarks.train_step import _Tokenizer, training_step
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # No utils.tune_memory_allocator() here: it keeps up to 1 GB of freed memory resident, which would blur what
    # the peak says about live tensors. With glibc's defaults RSS follows them.
    config_file, model_name = TASKS[task]
    config = utils.load_config(os.path.join(ROOT, 'configs', config_file))
    with open(os.path.join(ROOT, 'configs', 'config_bert.json')) as f:
        config['bert_config'] = json.load(f)
    config.update(image_res=image_res, grad_checkpointing=grad_checkpointing)
    vocab = config['bert_config']['vocab_size']
    model = models.create_model(model_name, config, _Tokenizer(vocab))
    if hasattr(model, 'copy_params'):
        model.copy_params()
    model.train()
    optimizer = create_optimizer(utils.AttrDict(opt='adamW', lr=1e-5, weight_decay=0.02), model)
    peaks = []
    for batch in sorted(batches):
        args, kwargs = build_inputs(task, batch, image_res, vocab)
        for _ in range(2):
            training_step(model, optimizer, args, kwargs, torch.device('cpu'), precision)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(task=task, image_res=image_res, batches=sorted(batches), grad_checkpointing=grad_checkpointing,
                precision=precision, peak_rss_mb=peaks)


def run_subprocess(task, image_res, batches, grad_checkpointing, precision, threads) -> dict:
    argv = [sys.executable, '-m', 'benchmarks.memory_table', '--one', task, str(image_res),
            ','.join(map(str, batches)), '--precision', precision, '--threads', str(threads)]
    argv += ['--grad-checkpointing'] if grad_checkpointing else []
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'measurement {argv[3:]} failed:\n' + '\n'.join(out.stderr.strip().splitlines()[-5:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(measured: dict) -> dict:
    """Fixed and per-sample memory from the peaks at two batch sizes."""
    (small, large), (peak_small, peak_large) = measured['batches'], measured['peak_rss_mb']
    per_sample = (peak_large - peak_small) / (large - small)
    fixed = peak_small - per_sample * small
    fits = {f'fits_{c}gb': int((c * 1024 - fixed) // per_sample) if per_sample > 0 else None for c in CARDS_GB}
    return dict(task=measured['task'], image_res=measured['image_res'],
                grad_checkpointing=measured['grad_checkpointing'], precision=measured['precision'], fixed_mb=fixed,
                per_sample_mb=per_sample, **fits, measured=measured)


def row(r: dict) -> str:
    fits = ' | '.join(str(r[f'fits_{c}gb']) for c in CARDS_GB)
    return (f"| {r['task']} | {r['image_res']} | {'yes' if r['grad_checkpointing'] else 'no'} | "
            f"{r['fixed_mb'] / 1024:.2f} | {r['per_sample_mb']:.0f} | {fits} |")


HEADER = ('| task | px | checkpointing | fixed GB | MB per sample | '
          + ' | '.join(f'batch on {c} GB' for c in CARDS_GB) + ' |\n' + '| --- ' * (5 + len(CARDS_GB)) + '|')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tasks', nargs='+', choices=sorted(TASKS), default=list(TASKS))
    p.add_argument('--res', nargs='+', type=int, default=[256, 384])
    p.add_argument('--batches', nargs=2, type=int, default=[2, 6], metavar=('SMALL', 'LARGE'))
    p.add_argument('--checkpointing', choices=['both', 'on', 'off'], default='both')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None, help='also write the rows (and raw measurements) as JSON here')
    p.add_argument('--one', nargs=3, metavar=('TASK', 'RES', 'BATCHES'), help=argparse.SUPPRESS)
    p.add_argument('--grad-checkpointing', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        task, res, batches = args.one
        print(json.dumps(measure_one(task, int(res), [int(b) for b in batches.split(',')], args.grad_checkpointing,
                                     args.precision, args.threads)))
        return 0
    small, large = sorted(args.batches)
    if small == large:
        p.error('--batches needs two different sizes')
    checkpointing = {'both': [False, True], 'on': [True], 'off': [False]}[args.checkpointing]
    rows = []
    print(HEADER, flush=True)
    for task in args.tasks:
        for res in args.res:
            for ckpt in checkpointing:
                shift = max(0, MIN_BATCH.get(task, 1) - small)
                measured = run_subprocess(task, res, [small + shift, large + shift], ckpt, args.precision,
                                          args.threads)
                rows.append(summarise(measured))
                print(row(rows[-1]), flush=True)
    if args.out:
        import utils
        utils.atomic_write_text(args.out, json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
