"""Helpers for tests that run the task scripts on a toy world.

`make_toy_config` rewrites a configs/toy/*.yaml so that its data paths point at a given toy world (tests use
freshly seeded worlds in temp folders, not the demo's data/toyworld) and applies overrides.
"""
import os

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_PREFIX = 'data/toyworld'

# Small but learnable worlds for the test suite (the demo uses the generator's defaults).
TEST_WORLD_SIZES = {'train_images': 1200, 'val_images': 150, 'test_images': 150}


def _redirect(value, world_dir):
    if isinstance(value, str) and value.startswith(TOY_PREFIX):
        return world_dir + value[len(TOY_PREFIX):]
    if isinstance(value, list):
        return [_redirect(v, world_dir) for v in value]
    return value


def make_toy_config(name: str, world_dir: str, out_path: str, **overrides) -> str:
    """Write configs/toy/<name>.yaml with data paths under `world_dir` and `overrides` applied; returns its path."""
    config = utils.load_config(os.path.join(ROOT, 'configs', 'toy', f'{name}.yaml'))
    config = {k: _redirect(v, world_dir) for k, v in config.items()}
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    config.update(overrides)
    utils.save_config(config, out_path)
    return out_path


def generate_world(out_dir: str, seed: int, **sizes) -> str:
    """Generate a toy world (quietly) and return its folder."""
    from dataset import toyworld
    toyworld.generate(out_dir, seed=seed, verbose=False, **{**TEST_WORLD_SIZES, **sizes})
    return out_dir


def _content_key(world_dir: str) -> str:
    """Hash of what a toy pretraining's result depends on: code, config, world manifest, library versions."""
    import glob
    import hashlib
    import torch
    h = hashlib.sha256(torch.__version__.encode())
    files = sorted(glob.glob(os.path.join(ROOT, 'models', '*.py')) + glob.glob(os.path.join(ROOT, 'dataset', '*.py'))
                   + glob.glob(os.path.join(ROOT, 'optim', '*.py')) + glob.glob(os.path.join(ROOT, 'scheduler', '*.py'))
                   + [os.path.join(ROOT, n) for n in ('engine.py', 'utils.py', 'Pretrain.py')]
                   + glob.glob(os.path.join(ROOT, 'configs', 'toy', '*')))
    for path in files:
        with open(path, 'rb') as f:
            h.update(path[len(ROOT):].encode() + f.read())
    import json
    with open(os.path.join(world_dir, 'manifest.json')) as f:
        manifest = json.load(f)
    # The generation arguments fix the world's content (file hashes would also encode the folder it lives in).
    h.update(json.dumps([manifest['format_version'], manifest['args']], sort_keys=True).encode())
    return h.hexdigest()[:16]


def pretrain_cached(world_dir: str, cache_root: str) -> str:
    """Run the toy pretraining once per content key (file-locked), returning its output folder."""
    import fcntl
    import shutil
    import Pretrain
    os.makedirs(cache_root, exist_ok=True)
    key = _content_key(world_dir)
    out = os.path.join(cache_root, key)
    with open(out + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session pretraining the same thing: wait for it
        if not os.path.isfile(os.path.join(out, 'DONE')):
            shutil.rmtree(out, ignore_errors=True)
            cfg = make_toy_config('Pretrain', world_dir, out + '.yaml')
            Pretrain.main(['--config', cfg, '--output_dir', out, '--device', 'cpu', '--no-distributed'])
            open(os.path.join(out, 'DONE'), 'w').close()
    return out
