"""Time a full retrieval evaluation (features + ITM re-ranking + R@K): our fast path vs. the per-query reference.

    python -m benchmarks.retrieval_eval --size small --images 64 --captions 5 --k-test 16            # table
    python -m benchmarks.retrieval_eval --size small --images 64 --captions 5 --k-test 16 --precision bf16
    python -m benchmarks.retrieval_eval --size small --images 64 --captions 5 --k-test 16 --json     # one line

Inputs: random images, `--captions` random captions of 6-20 words per image (each word one token, so a caption is
[CLS] + 6-20 tokens, padded to 30 like the evaluation tokenization), a randomly initialised retrieval model of
`--size` (small: ViT 384 wide x 6 deep x 6 heads on 128 px with patch 16, BERT 384 x 6 layers with fusion at 3,
6 heads, intermediate 1536, embed_dim 256), images batched 64 at a time, 2 threads.

Each measurement is the median of `--repeats` full evaluations after one untimed warm-up. The table runs the
reference (fp32, per query, the original's algorithm) and the fast path in the same process and checks that their
score matrices agree (max |difference| over all entries, the same -100 pattern) and their recalls are equal; the
bf16 row is compared with the fp32 reference the same way (its differences are bf16 rounding). --json measures
only the fast path (or `--impl reference`) and prints one JSON line with median_s and the process's peak_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time

from benchmarks.train_step import SIZES, build_config  # the model sizes shared by the benchmarks

TEXT_LEN = 30
MIN_WORDS, MAX_WORDS = 6, 20
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def make_tokenizer(vocab_size: int, folder: str):
    """A real (fast) BertTokenizer over a synthetic vocabulary in which every word w<i> is one token."""
    from models.tokenization_bert import BertTokenizer
    with open(os.path.join(folder, 'vocab.txt'), 'w') as f:
        f.write('\n'.join(SPECIALS + [f'w{i}' for i in range(vocab_size - len(SPECIALS))]) + '\n')
    return BertTokenizer.from_pretrained(folder)


class RandomRetrievalSet:
    """A re_eval_dataset look-alike: random images, `captions` random captions each, the txt2img/img2txt maps."""

    def __init__(self, n_images: int, captions: int, image_res: int, vocab_words: int, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.images = torch.randn(n_images, 3, image_res, image_res, generator=g)
        self.text, self.txt2img, self.img2txt = [], {}, {}
        for i in range(n_images):
            self.img2txt[i] = []
            for _ in range(captions):
                words = rng.randint(MIN_WORDS, MAX_WORDS)
                self.img2txt[i].append(len(self.text))
                self.txt2img[len(self.text)] = i
                self.text.append(' '.join(f'w{rng.randrange(vocab_words)}' for _ in range(words)))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def build(args):
    import torch
    import models
    import utils
    from torch.utils.data import DataLoader
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    utils.tune_memory_allocator()  # as the task scripts do (utils.prepare_run)
    config = build_config(args.size, False)
    config['queue_size'] = 1024  # the queue plays no part in evaluation; keep the model small in memory
    model = models.create_model('retrieval', config).eval()
    tokenizer = make_tokenizer(config['bert_config']['vocab_size'], tempfile.mkdtemp(prefix='retrieval_bench_'))
    data = RandomRetrievalSet(args.images, args.captions, config['image_res'],
                              config['bert_config']['vocab_size'] - len(SPECIALS))
    loader = DataLoader(data, batch_size=64, shuffle=False, num_workers=0)
    return model, tokenizer, loader


def run_once(impl: str, precision: str, model, tokenizer, loader, args):
    import torch
    from evaluation import retrieval as R
    from tests.retrieval_reference import evaluate_reference  # the original's per-query loop, a test oracle
    device = torch.device('cpu')
    if impl == 'fast':
        return R.score_matrices(model, loader, tokenizer, device, k_test=args.k_test, precision=precision,
                                itm_batch_size=args.itm_batch_size, progress=False)
    return evaluate_reference(model, loader, tokenizer, device, k_test=args.k_test, precision=precision,
                              progress=False)


def measure(impl: str, precision: str, model, tokenizer, loader, args) -> tuple[dict, tuple]:
    """Warm-up + `repeats` timed evaluations; returns (timing record, score matrices of the last run)."""
    from evaluation.retrieval import itm_eval
    scores = run_once(impl, precision, model, tokenizer, loader, args)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores = run_once(impl, precision, model, tokenizer, loader, args)
        times.append(time.perf_counter() - start)
    metrics = itm_eval(*scores, loader.dataset.txt2img, loader.dataset.img2txt)
    record = dict(impl=impl, precision=precision, size=args.size, images=args.images, captions=args.captions,
                  k_test=args.k_test, itm_batch_size=args.itm_batch_size, threads=args.threads,
                  median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  txt_r1=metrics['txt_r1'], img_r1=metrics['img_r1'], r_mean=metrics['r_mean'])
    return record, scores


def compare(scores, ref) -> dict:
    """Max |difference| of both matrices, whether the -100 (not re-ranked) pattern is identical."""
    import numpy as np
    out = {'max_abs_diff': max(float(np.abs(a - b).max()) for a, b in zip(scores, ref))}
    out['same_topk'] = all(bool(((a == -100) == (b == -100)).all()) for a, b in zip(scores, ref))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', choices=sorted(SIZES), default='small')
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--captions', type=int, default=5, help='captions per image')
    p.add_argument('--k-test', dest='k_test', type=int, default=16)
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    p.add_argument('--itm-batch-size', dest='itm_batch_size', type=int, default=1024)
    p.add_argument('--impl', choices=['fast', 'reference'], default='fast', help='what --json measures')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--json', action='store_true', help='one JSON line for --impl at --precision')
    args = p.parse_args(argv)
    model, tokenizer, loader = build(args)
    n_txt = len(loader.dataset.text)
    if args.json:
        record, _ = measure(args.impl, args.precision, model, tokenizer, loader, args)
        print(json.dumps(record))
        return 0

    rows = []
    ref_record, ref_scores = measure('reference', 'fp32', model, tokenizer, loader, args)
    rows.append((ref_record, {'max_abs_diff': 0.0, 'same_topk': True}))
    precisions = ['fp32'] + (['bf16'] if args.precision == 'bf16' else [])
    for precision in precisions:
        record, scores = measure('fast', precision, model, tokenizer, loader, args)
        rows.append((record, compare(scores, ref_scores)))
    print(f'retrieval evaluation, size {args.size}: {args.images} images x {args.captions} captions '
          f'({n_txt} texts), k_test {args.k_test}, {args.threads} threads, median of {args.repeats} after a warm-up')
    print('| implementation | precision | median s | min / max s | TR@1 | IR@1 | max abs diff vs reference | '
          'same top-k | speed-up |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for record, cmp in rows:
        print(f"| {record['impl']} | {record['precision']} | {record['median_s']:.2f} | {record['min_s']:.2f} / "
              f"{record['max_s']:.2f} | {record['txt_r1']:.2f} | {record['img_r1']:.2f} | "
              f"{cmp['max_abs_diff']:.2e} | {cmp['same_topk']} | "
              f"{ref_record['median_s'] / record['median_s']:.2f}x |")
    print(f"peak RSS of this process (all rows): {rows[-1][0]['peak_rss_mb']:.0f} MB; "
          f"recalls identical to the reference: "
          f"{all(r['txt_r1'] == ref_record['txt_r1'] and r['img_r1'] == ref_record['img_r1'] for r, _ in rows)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
