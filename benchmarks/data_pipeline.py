"""Throughput of the pretraining image transform: our OpenCV/numpy RandomAugment vs a plain-PIL version.

Pipeline (the original's 'pretrain' transform): RandomResizedCrop(256, scale 0.2-1, bicubic) -> RandomHorizontalFlip ->
RandomAugment(2, 7, 10 ops) -> ToTensor -> Normalize, applied to random 640x480 images that went through a JPEG
encode/decode round trip (decoding is done once, before timing). The PIL variant implements the same 10 ops with
the same argument rules and RNG draws using PIL (ImageOps / ImageEnhance / Image.transform). Also timed: the
RandomAugment stage alone on 256x256 crops.

Each measurement: warm-up runs, then --repeats runs over --images images; reported as images/s (median, min, max
over runs). Threads default to 1 (torch and OpenCV), as inside one DataLoader worker.

    .venv/bin/python -m benchmarks.data_pipeline [--images 64] [--repeats 7] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, RandomAugment
from dataset.transforms import MEAN, STD, build_transform

FILL = (128, 128, 128)


class PILRandomAugment:
    """Reference: the same ops / arguments / numpy RNG draws as RandomAugment, implemented with plain PIL.

    Returns a PIL image. (Results are close to, not bit-identical with, the OpenCV version: PIL's affine
    sampling, enhance rounding and Sharpness border handling differ.)
    """

    def __init__(self, N=2, M=7, augs=DEFAULT_AUGS):
        self.N, self.M, self.augs = N, M, np.array(list(augs))

    def __call__(self, img: Image.Image) -> Image.Image:
        level = self.M / 10
        for name in np.random.choice(self.augs, self.N):
            if np.random.random() > 0.5:
                continue
            if name == 'Identity':
                continue
            if name == 'AutoContrast':
                img = ImageOps.autocontrast(img)
            elif name == 'Equalize':
                img = ImageOps.equalize(img)
            elif name == 'Brightness':
                img = ImageEnhance.Brightness(img).enhance(level * 1.8 + 0.1)
            elif name == 'Sharpness':
                img = ImageEnhance.Sharpness(img).enhance(level * 1.8 + 0.1)
            elif name == 'Rotate':
                angle = level * 30
                if np.random.random() < 0.5:
                    angle = -angle
                img = img.rotate(angle, Image.BILINEAR, fillcolor=FILL)
            else:
                mag = level * (0.3 if name.startswith('Shear') else 10.0)
                if np.random.random() > 0.5:
                    mag = -mag
                # PIL's AFFINE data maps output -> input (the inverse of the forward matrix).
                data = {'ShearX': (1, -mag, 0, 0, 1, 0), 'ShearY': (1, 0, 0, -mag, 1, 0),
                        'TranslateX': (1, 0, mag, 0, 1, 0), 'TranslateY': (1, 0, 0, 0, 1, mag)}[name]
                img = img.transform(img.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=FILL)
        return img


def pil_pretrain_transform(res: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(res, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        PILRandomAugment(2, 7),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def make_images(n: int, seed: int, size=(640, 480)) -> list[Image.Image]:
    """Random natural-ish images (smooth colour fields + noise), JPEG-encoded (q 90) and decoded."""
    rs = np.random.RandomState(seed)
    w, h = size
    out = []
    for _ in range(n):
        small = rs.randint(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
        arr = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        arr = np.clip(arr + rs.randint(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format='JPEG', quality=90)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
        out.append(img.convert('RGB'))
    return out


def measure(fn, items, repeats: int, warmup: int, seed: int) -> dict:
    rates = []
    for r in range(warmup + repeats):
        np.random.seed(seed + r)
        torch.manual_seed(seed + r)
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        dt = time.perf_counter() - t0
        if r >= warmup:
            rates.append(len(items) / dt)
    return {'median': statistics.median(rates), 'min': min(rates), 'max': max(rates), 'runs': len(rates)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=64, help='images per run')
    p.add_argument('--repeats', type=int, default=7, help='timed runs (after warm-up)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--res', type=int, default=256)
    p.add_argument('--threads', type=int, default=1, help='torch and OpenCV threads (1 = one DataLoader worker)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    images = make_images(args.images, args.seed)
    crops = [im.resize((args.res, args.res), Image.BICUBIC) for im in images]

    ours_full = build_transform('pretrain', args.res)
    pil_full = pil_pretrain_transform(args.res)
    ours_ra = RandomAugment(2, 7, isPIL=True, augs=list(DEFAULT_AUGS))
    pil_ra = PILRandomAugment(2, 7)
    kw = dict(repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    results = {
        'full_transform_ours': measure(ours_full, images, **kw),
        'full_transform_pil': measure(pil_full, images, **kw),
        'randaugment_only_ours': measure(ours_ra, crops, **kw),
        'randaugment_only_pil': measure(pil_ra, crops, **kw),
    }
    info = {'images': args.images, 'repeats': args.repeats, 'res': args.res, 'threads': args.threads,
            'input': '640x480 JPEG q90 decoded', 'python': platform.python_version(), 'opencv': cv2.__version__,
            'torch': torch.__version__, 'pillow': Image.__version__, 'cpu': platform.processor() or platform.machine()}
    speedup_full = results['full_transform_ours']['median'] / results['full_transform_pil']['median']
    speedup_ra = results['randaugment_only_ours']['median'] / results['randaugment_only_pil']['median']
    if args.json:
        print(json.dumps({'benchmark': 'data_pipeline', **info, 'results': results,
                          'speedup_full': speedup_full, 'speedup_randaugment': speedup_ra}))
        return 0
    print(f'pretrain transform at {args.res}px on {args.images} decoded 640x480 JPEGs, '
          f'{args.threads} thread(s), median of {args.repeats} runs after {args.warmup} warm-up')
    print(f'{"measurement":<28}{"median img/s":>14}{"min":>10}{"max":>10}')
    for name, r in results.items():
        print(f'{name:<28}{r["median"]:>14.1f}{r["min"]:>10.1f}{r["max"]:>10.1f}')
    print(f'speed-up (ours / PIL): full transform {speedup_full:.2f}x, RandomAugment stage {speedup_ra:.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
