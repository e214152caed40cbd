"""Inference at full size: memory of the inference model against the training model, and folder search speed.

    python -m benchmarks.inference memory [--size full|small|toy] [--image-res 384] [--json]
    python -m benchmarks.inference search [--size full] [--image-res 384] [--images 1000] [--precision bf16] [--json]

`memory` writes a random full-size retrieval checkpoint in the released fine-tuned layout (mscoco.pth: flat,
online weights only) and loads it, each in its own process, three ways: `models.load_model` (the inference
model: online encoders only), the training model as Retrieval.py builds it (momentum copies, 65,536-entry feature
queues), and the training model with its AdamW state allocated. It prints the resident memory after loading
(VmRSS) and the peak (VmHWM) of each process, and the ratios.

`search` generates --images photo-sized JPEGs (640x480, random shapes), then runs the folder search of
`Predict.py --images` in one process: the model load, the first query (every image embedded and cached, then
ITM re-ranking of the top 16 and Grad-CAM of the top 5) and a second query (features from the cache). Threads:
torch's default (all cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The model sizes of benchmarks/train_step.py: 'full' is ViT-B/16 + BERT-base, 'toy' the toy configs' model.
from benchmarks.train_step import SIZES, build_config as train_step_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_vocab(folder: str, size: int) -> str:
    """A WordPiece vocab.txt of `size` entries (special tokens, some words, fillers) for an offline tokenizer."""
    from dataset.toyworld import build_vocab
    words = [w for w in build_vocab() if w not in ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')]
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
    vocab = (vocab + [f'[unused{i}]' for i in range(size)])[:size]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'vocab.txt'), 'w') as f:
        f.write('\n'.join(vocab) + '\n')
    return folder


def build_config(size: str, image_res: int, vocab: str) -> dict:
    """train_step.py's config of `size` at `image_res`, with the tokenizer folder `vocab` and no pretrained weights."""
    config = train_step_config(size, grad_checkpointing=False)
    config.update(image_res=image_res, distill=True, text_encoder=vocab, load_text_weights=False)
    return config


def write_checkpoint(work: str, size: str, image_res: int) -> tuple[str, dict]:
    """A random retrieval model in the released fine-tuned layout (flat, online weights only) and its config."""
    import torch
    import models
    from models.inference import _tokenizer
    config = build_config(size, image_res, write_vocab(os.path.join(work, 'vocab'), SIZES[size]['bert'].get('vocab_size', 30522)))
    torch.manual_seed(0)
    model = models.create_model('retrieval', config, _tokenizer(config), inference=True)
    path = os.path.join(work, 'mscoco_random.pth')
    torch.save(model.state_dict(), path)
    with open(os.path.join(work, 'config.json'), 'w') as f:
        json.dump(config, f)
    return path, config


def memory_status() -> dict:
    """VmRSS (now) and VmHWM (peak) of this process in GB."""
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(('VmRSS:', 'VmHWM:')):
                out[line.split(':')[0]] = int(line.split()[1]) / 1e6
    return {'rss_gb': out['VmRSS'], 'peak_gb': out['VmHWM']}


def measure_one(way: str, ckpt: str, config_path: str) -> dict:
    """Load `ckpt` one `way` in this process and return its memory."""
    import torch
    with open(config_path) as f:
        config = json.load(f)
    if way == 'inference':
        from models import load_model
        model = load_model(ckpt, config=config, device='cpu').model
    else:
        import models
        from models.checkpoint import load_checkpoint
        from models.inference import _tokenizer
        model = models.create_model('retrieval', config, _tokenizer(config))
        load_checkpoint(model, ckpt, 'retrieval')
        if way == 'training+adamw':
            from optim import create_optimizer
            import utils
            opt = create_optimizer(utils.AttrDict({'opt': 'adamW', 'lr': 1e-5, 'weight_decay': 0.02}), model)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            opt.step()  # allocates the two moments per trainable tensor
            for p in model.parameters():
                p.grad = None
    floats = sum(v.numel() for v in model.state_dict().values())
    return {'way': way, 'state_floats_m': floats / 1e6, **memory_status()}


def run_memory(args) -> dict:
    with tempfile.TemporaryDirectory() as work:
        ckpt, config = write_checkpoint(work, args.size, args.image_res)
        rows = []
        for way in ('inference', 'training', 'training+adamw'):
            out = subprocess.run([sys.executable, '-m', 'benchmarks.inference', 'one', way, ckpt,
                                  os.path.join(work, 'config.json')], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f'error: measuring {way} failed: {out.stderr.strip().splitlines()[-1:]}')
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r['way']: r for r in rows}
    for r in rows:
        r['rss_ratio_to_training'] = r['rss_gb'] / base['training']['rss_gb']
        r['peak_ratio_to_training'] = r['peak_gb'] / base['training']['peak_gb']
    return {'benchmark': 'inference_memory', 'size': args.size, 'image_res': args.image_res, 'rows': rows}


def make_photos(folder: str, n: int, seed: int = 0) -> None:
    """`n` 640x480 JPEGs of random coloured shapes on random backgrounds."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = Image.new('RGB', (640, 480), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x, y = int(rng.integers(0, 540)), int(rng.integers(0, 380))
            s = int(rng.integers(40, 200))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + s, y + s], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(os.path.join(folder, f'photo_{i:05d}.jpg'), quality=90)


def run_search(args) -> dict:
    import torch
    from evaluation.folder_search import FolderIndex, search
    from models import load_model
    with tempfile.TemporaryDirectory() as work:
        ckpt, config = write_checkpoint(work, args.size, args.image_res)
        photos = os.path.join(work, 'photos')
        make_photos(photos, args.images)
        start = time.perf_counter()
        model = load_model(ckpt, config=config, device='cpu', precision=args.precision)
        load_s = time.perf_counter() - start
        cache = os.path.join(work, 'cache')
        timings = []
        for query in ('a red circle on a blue background', 'two green squares'):
            start = time.perf_counter()
            index = FolderIndex.build(model, photos, cache, batch_size=args.batch_size, progress=not args.json)
            embedded = time.perf_counter() - start
            hits = search(model, index, query, top_k=5, k_rerank=16)
            model.gradcam_batch([h['path'] for h in hits], query)
            timings.append({'query_s': time.perf_counter() - start, 'embed_s': embedded, 'cached': index.cached})
    first, second = timings
    return {'benchmark': 'folder_search', 'size': args.size, 'image_res': args.image_res, 'images': args.images,
            'precision': args.precision, 'threads': torch.get_num_threads(), 'load_s': load_s,
            'images_per_s': args.images / first['embed_s'], 'first_query_s': first['query_s'],
            'second_query_s': second['query_s'], 'second_cached': second['cached']}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ['one']:  # a child process of `memory`
        print(json.dumps(measure_one(*argv[1:4])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('what', choices=['memory', 'search'])
    p.add_argument('--size', default='full', choices=sorted(SIZES))
    p.add_argument('--image-res', type=int, default=384, help='384: the fine-tuned checkpoints; 256: ALBEF.pth')
    p.add_argument('--images', type=int, default=1000, help='search: folder size')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--json', action='store_true', help='print one JSON line instead of a table')
    args = p.parse_args(argv)
    if args.what == 'memory':
        report = run_memory(args)
        if args.json:
            print(json.dumps(report))
            return 0
        print(f"Memory after loading a {args.size}-size retrieval checkpoint at {args.image_res} px (one process each)")
        print('| model | state floats (M) | RSS GB | peak GB | RSS vs training |\n| --- | --- | --- | --- | --- |')
        for r in report['rows']:
            print(f"| {r['way']} | {r['state_floats_m']:.1f} | {r['rss_gb']:.2f} | {r['peak_gb']:.2f} | "
                  f"{r['rss_ratio_to_training']:.2f}x |")
        return 0
    report = run_search(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"Folder search, {args.size} size at {args.image_res} px, {args.precision}, {report['threads']} threads, "
          f"{args.images} images")
    print('| step | value |\n| --- | --- |')
    print(f"| load the checkpoint | {report['load_s']:.1f} s |")
    print(f"| embed the folder | {report['images_per_s']:.2f} images/s |")
    print(f"| first query (embed, rank, ITM re-rank 16, Grad-CAM 5) | {report['first_query_s']:.1f} s |")
    print(f"| second query (cached features) | {report['second_query_s']:.2f} s |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
