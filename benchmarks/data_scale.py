"""Pretraining data at scale: memory, start-up and loading speed of the annotation stores, and of tar shards.

Synthetic data in --workdir (default: a temporary folder, removed afterwards): --images tiny placeholder JPEGs
(48x48) reused by a pretraining JSON of --captions items (absolute image paths, ~80-character captions), and
webdataset tar shards of --shard_samples samples (the same pictures and captions, 10,000 samples a shard) next to
a JSON of the same samples as loose files.

Each measurement runs in a fresh process (so memory and start-up are its own):

* list-of-dicts: the store this repository used before: json.load of the file into a Python list of dicts, every
  item checked as pretrain_dataset checks it (built here, for the comparison);
* compact (cold): dataset.utils.Annotations with no index file yet (parse, check, write the index);
* compact (warm): the same file again (the index file is reused);
* JSON + loose files / tar shards: --shard_samples samples, through the same loader (the shards twice: the
  first run scans them and writes their index files, the second reuses those);
* baseline: the list-of-dicts store of a JSON just large enough for the batches (32,000 items by default): what
  the processes hold without a large annotation store (the runtime: torch, the loader), subtracted in the
  'above baseline' column.

Start-up = building the dataset. Then a DataLoader with --workers forked workers, shuffled by the training
sampler (dataset.resumable.build_train_loader; the shards get its BlockOrderSampler), iterates --batches batches
of --batch_size; images/s counts from the first batch to the last. Memory = sum of the PSS (proportional set size:
shared pages divided among the processes sharing them) of the main process and its workers, from
/proc/<pid>/smaps_rollup, the largest of samples taken after batch 1, at half-way and at the end. The image
transform is light (resize to --image_res, to tensor) so the loader, not augmentation, is measured.

    .venv/bin/python -m benchmarks.data_scale [--captions 2000000] [--workers 4] [--batches 500] [--json]
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARD_SIZE = 10_000


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------------
def caption(i: int) -> str:
    return f'a synthetic caption number {i} for a small placeholder picture of some things on a table'


def make_images(folder: str, n: int) -> list[str]:
    """n distinct 48x48 noise JPEGs; returns their absolute paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f'img_{i:05d}.jpg')
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path, quality=75)
        paths.append(path)
    return paths


def write_json(path: str, images: list[str], n: int) -> None:
    """A pretraining JSON of n items, written in pieces (a 2M-item list of dicts would itself be the cost)."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('[')
        for start in range(0, n, 100_000):
            chunk = [{'image': images[i % len(images)], 'caption': caption(i)}
                     for i in range(start, min(n, start + 100_000))]
            f.write((',' if start else '') + json.dumps(chunk)[1:-1])
        f.write(']')


def write_shards(folder: str, images: list[str], n: int) -> str:
    """n samples (KEY.jpg + KEY.txt, as img2dataset writes them) in shards of SHARD_SIZE; returns the brace spec."""
    os.makedirs(folder, exist_ok=True)
    blobs = [open(p, 'rb').read() for p in images]
    n_shards = -(-n // SHARD_SIZE)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
            for i in range(s * SHARD_SIZE, min(n, (s + 1) * SHARD_SIZE)):
                for ext, data in (('jpg', blobs[i % len(blobs)]), ('txt', caption(i).encode())):
                    info = tarfile.TarInfo(f'{i:09d}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f'{{00000..{n_shards - 1:05d}}}.tar')


# ----------------------------------------------------------------------------------------------------------------
# One measurement (run in a child process)
# ----------------------------------------------------------------------------------------------------------------
class LegacyAnnotations:
    """The former store: every item a dict in one Python list; per-file start offsets for error messages."""

    def __init__(self, items: list, files: list[str], starts: list[int]):
        self.items, self.files, self.starts = items, files, starts

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def where(self, index: int) -> str:
        return f'{self.files[0]} item {index}'


def build_dataset(kind: str, source: str, transform):
    """The dataset of one measurement: 'legacy' / 'compact' (a JSON file) or 'shards' (a shard spec)."""
    from dataset.caption_dataset import pretrain_dataset
    from dataset.shards import ShardDataset
    from dataset.utils import DataError, check_items, check_visible_text, read_json_file, resolve_image_path
    if kind == 'shards':
        return ShardDataset([source], transform)
    if kind == 'compact':
        return pretrain_dataset(source, transform)

    def check(item, where):  # pretrain_dataset's checks
        if isinstance(item['caption'], list) and not item['caption']:
            raise DataError(f'{where}: key \'caption\' is an empty list')
        check_visible_text(item['caption'], 'caption', where)
        resolve_image_path('', item['image'], True, where, check_file_link=False)

    items = read_json_file(source)
    check_items(items, source, {'image': str, 'caption': (str, list)}, check)
    ds = pretrain_dataset.__new__(pretrain_dataset)
    ds.ann = LegacyAnnotations(items, [source], [0])
    ds.transform, ds.max_words, ds.image_root, ds.allow_absolute_paths = transform, 30, '', True
    ds._init_image_loading(False)
    return ds


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (KiB), from /proc/<pid>/smaps_rollup."""
    with open(f'/proc/{pid}/smaps_rollup') as f:
        for line in f:
            if line.startswith('Pss:'):
                return int(line.split()[1])
    raise RuntimeError(f'no Pss line for pid {pid}')


def measure(kind: str, source: str, workers: int, batches: int, batch_size: int, image_res: int) -> dict:
    """Start-up, images/s and the largest PSS sum of main + workers for one dataset."""
    import torch
    from torchvision import transforms
    from dataset.resumable import build_train_loader
    torch.set_num_threads(1)
    transform = transforms.Compose([transforms.Resize((image_res, image_res)), transforms.ToTensor()])
    t0 = time.perf_counter()
    ds = build_dataset(kind, source, transform)
    startup = time.perf_counter() - t0
    loader = build_train_loader(ds, batch_size, workers, seed=0)
    loader.sampler.set_epoch(0)
    it = iter(loader)
    pids = [os.getpid()] + [w.pid for w in getattr(it, '_workers', [])]
    memory, t_first, done = 0, None, 0
    for b in range(min(batches, len(loader))):
        next(it)
        done += 1
        if b == 0:
            t_first = time.perf_counter()
        if b in (0, batches // 2, batches - 1):
            memory = max(memory, sum(pss_kib(p) for p in pids))
    elapsed = time.perf_counter() - t_first
    memory = max(memory, sum(pss_kib(p) for p in pids))
    del it
    return {'items': len(ds), 'startup_s': startup, 'pss_mib': memory / 1024, 'batches': done,
            'images_per_s': (done - 1) * batch_size / elapsed if done > 1 and elapsed > 0 else float('nan')}


def run_child(kind: str, source: str, args) -> dict:
    if args.in_process:
        return measure(kind, source, args.workers, args.batches, args.batch_size, args.image_res)
    cmd = [sys.executable, '-m', 'benchmarks.data_scale', '--_measure', kind, source, '--workers', str(args.workers),
           '--batches', str(args.batches), '--batch_size', str(args.batch_size), '--image_res', str(args.image_res)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f'measurement {kind} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    base = results['runs']['baseline (small JSON)']['pss_mib']
    rows = [('store / format', 'items', 'start-up s', 'PSS main+workers MiB', 'above baseline MiB', 'images/s')]
    for name, r in results['runs'].items():
        rows.append((name, f"{r['items']:,}", f"{r['startup_s']:.2f}", f"{r['pss_mib']:.0f}",
                     f"{r['pss_mib'] - base:.0f}", f"{r['images_per_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    r = results['ratios']
    lines.append('')
    lines.append(f"compact (warm) / list-of-dicts: PSS {r['pss_warm']:.2f}x ({r['pss_warm_above']:.2f}x above the "
                 f"baseline), start-up {r['startup_warm']:.3f}x")
    lines.append(f"compact (cold) / list-of-dicts: PSS {r['pss_cold']:.2f}x ({r['pss_cold_above']:.2f}x above the "
                 f"baseline), start-up {r['startup_cold']:.2f}x")
    lines.append(f"tar shards (warm) / JSON + loose files: {r['shards_vs_loose']:.2f}x images/s")
    return '\n'.join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--captions', type=int, default=2_000_000, help='items of the pretraining JSON')
    p.add_argument('--images', type=int, default=300, help='distinct placeholder images')
    p.add_argument('--shard_samples', type=int, default=40_000, help='samples of the shards vs loose files run')
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--batches', type=int, default=500)
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--image_res', type=int, default=32)
    p.add_argument('--workdir', default=None, help='keep the synthetic data here (default: a temporary folder)')
    p.add_argument('--json', action='store_true', help='print the results as JSON instead of a table')
    p.add_argument('--in_process', action='store_true',
                   help='measure in this process (quick smoke test; memory and start-up are then not comparable)')
    p.add_argument('--_measure', nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(*args._measure, args.workers, args.batches, args.batch_size, args.image_res)))
        return {}

    workdir = args.workdir or tempfile.mkdtemp(prefix='albef-data-scale-')
    try:
        images = make_images(os.path.join(workdir, 'images'), args.images)
        big = os.path.join(workdir, 'pretrain.json')
        write_json(big, images, args.captions)
        loose = os.path.join(workdir, 'loose.json')
        write_json(loose, images, args.shard_samples)
        spec = write_shards(os.path.join(workdir, 'shards'), images, args.shard_samples)
        for name in os.listdir(workdir):  # earlier index files of a kept workdir: the cold run builds its own
            if name.endswith('.idx'):
                os.unlink(os.path.join(workdir, name))
        small = os.path.join(workdir, 'small.json')
        write_json(small, images, max(len(images), (args.batches + 1) * args.batch_size))
        runs = {'baseline (small JSON)': run_child('legacy', small, args),
                'list-of-dicts': run_child('legacy', big, args),
                'compact (cold)': run_child('compact', big, args),
                'compact (warm)': run_child('compact', big, args),
                'JSON + loose files': run_child('compact', loose, args),
                'tar shards (cold)': run_child('shards', spec, args),
                'tar shards (warm)': run_child('shards', spec, args)}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    legacy = runs['list-of-dicts']
    base = runs['baseline (small JSON)']['pss_mib']

    def above(name: str) -> float:
        return (runs[name]['pss_mib'] - base) / max(legacy['pss_mib'] - base, 1e-9)

    results = {
        'date': datetime.date.today().isoformat(), 'machine': platform.node(), 'cpus': os.cpu_count(),
        'args': {k: v for k, v in vars(args).items() if not k.startswith('_') and k not in ('json', 'workdir')},
        'runs': runs,
        'ratios': {'pss_warm': runs['compact (warm)']['pss_mib'] / legacy['pss_mib'],
                   'pss_warm_above': above('compact (warm)'), 'pss_cold_above': above('compact (cold)'),
                   'startup_warm': runs['compact (warm)']['startup_s'] / legacy['startup_s'],
                   'pss_cold': runs['compact (cold)']['pss_mib'] / legacy['pss_mib'],
                   'startup_cold': runs['compact (cold)']['startup_s'] / legacy['startup_s'],
                   'shards_vs_loose': runs['tar shards (warm)']['images_per_s']
                   / runs['JSON + loose files']['images_per_s']},
    }
    print(json.dumps(results, indent=1) if args.json else table(results))
    return results


if __name__ == '__main__':
    main()
