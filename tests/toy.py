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
