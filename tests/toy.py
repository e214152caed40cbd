"""Helpers for tests that run the task scripts on a toy world.

`make_toy_config` rewrites a configs/toy/*.yaml so that its data paths point at a given toy world (tests use
freshly seeded worlds in temp folders, not the demo's data/toyworld) and applies overrides.
"""
import contextlib
import fcntl
import os
import shutil

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


# Tiny models and a mini world for tests that run the task scripts end to end in seconds (what they learn does not
# matter there; the learning tests use the toy configs' own sizes).
MINI_WORLD_SIZES = {'train_images': 24, 'val_images': 8, 'test_images': 8, 'image_size': 48}
TINY_BERT = {'architectures': ['BertForMaskedLM'], 'attention_probs_dropout_prob': 0.0, 'hidden_act': 'gelu',
             'hidden_dropout_prob': 0.0, 'hidden_size': 32, 'initializer_range': 0.02, 'intermediate_size': 64,
             'layer_norm_eps': 1e-12, 'max_position_embeddings': 64, 'model_type': 'bert',
             'num_attention_heads': 2, 'num_hidden_layers': 2, 'pad_token_id': 0, 'type_vocab_size': 2,
             'vocab_size': 200, 'fusion_layer': 1, 'encoder_width': 32}
TINY = dict(bert_config=TINY_BERT, image_res=16, patch_size=8, vision_width=32, vision_depth=1, vision_num_heads=2,
            embed_dim=16, num_workers=0, print_freq=100, vision_pretrained=None)
TINY_SCHED = {'sched': 'cosine', 'lr': 1e-4, 'epochs': 1, 'min_lr': 1e-5, 'decay_rate': 1, 'warmup_lr': 1e-4,
              'warmup_epochs': 1, 'cooldown_epochs': 0}


def mini_config(name: str, world_dir: str, out_path, **overrides) -> str:
    """configs/toy/<name>.yaml with the TINY model, batch 4 (VE: 4 / test 5), one epoch and `overrides`."""
    batch = {'batch_size': 4} if name != 'VE' else {'batch_size_train': 4, 'batch_size_test': 5}
    return make_toy_config(name, world_dir, str(out_path),
                           **{**TINY, **batch, 'schedular': dict(TINY_SCHED), **overrides})


def generate_world(out_dir: str, seed: int, **sizes) -> str:
    """Generate a toy world (quietly) and return its folder."""
    from dataset import toyworld
    toyworld.generate(out_dir, seed=seed, verbose=False, **{**TEST_WORLD_SIZES, **sizes})
    return out_dir


def _content_key(world_dir: str) -> str:
    """Cache key of a toy pretraining: '<world>-<code>', hashes of the world's generation arguments and of what
    else the result depends on (code, config, library versions)."""
    import glob
    import hashlib
    import json
    import torch
    with open(os.path.join(world_dir, 'manifest.json')) as f:
        manifest = json.load(f)
    # The generation arguments fix the world's content (file hashes would also encode the folder it lives in).
    world = hashlib.sha256(json.dumps([manifest['format_version'], manifest['args']], sort_keys=True).encode())
    code = hashlib.sha256(torch.__version__.encode())
    files = sorted(glob.glob(os.path.join(ROOT, 'models', '*.py')) + glob.glob(os.path.join(ROOT, 'dataset', '*.py'))
                   + glob.glob(os.path.join(ROOT, 'optim', '*.py')) + glob.glob(os.path.join(ROOT, 'scheduler', '*.py'))
                   + glob.glob(os.path.join(ROOT, 'engine', '*.py')) + glob.glob(os.path.join(ROOT, 'utils', '*.py'))
                   + [os.path.join(ROOT, 'Pretrain.py')]
                   + [os.path.join(ROOT, 'configs', 'toy', n) for n in ('Pretrain.yaml', 'config_bert_toy.json')])
    for path in files:
        with open(path, 'rb') as f:
            code.update(path[len(ROOT):].encode() + f.read())
    return f'{world.hexdigest()[:8]}-{code.hexdigest()[:16]}'


@contextlib.contextmanager
def pretrain_cached(world_dir: str, cache_root: str):
    """Run the toy pretraining (after the world's supervised ViT it starts from, as `make demo` does) once per
    content key, yielding its output folder.

    The entry stays share-locked while the caller uses it; entries of the same world made by other code that
    nobody holds are deleted, so the cache keeps one pretraining per world (TOY_SEED) instead of one per commit
    ever tested.
    """
    import Pretrain
    os.makedirs(cache_root, exist_ok=True)
    key = _content_key(world_dir)
    out = os.path.join(cache_root, key)
    with open(out + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session pretraining the same thing: wait for it
        if not os.path.isfile(os.path.join(out, 'DONE')):
            shutil.rmtree(out, ignore_errors=True)
            cfg = make_toy_config('Pretrain', world_dir, out + '.yaml')
            from dataset.toyworld.supervised_vit import ensure_supervised_vit
            ensure_supervised_vit(world_dir, utils.load_config(cfg))
            Pretrain.main(['--config', cfg, '--output_dir', out, '--device', 'cpu', '--no-distributed'])
            open(os.path.join(out, 'DONE'), 'w').close()
        fcntl.flock(lock, fcntl.LOCK_SH)  # readers share it; a pruner (which needs it exclusively) skips it
        prune_cache(cache_root, keep=key)
        yield out


def prune_cache(cache_root: str, keep: str) -> list[str]:
    """Delete the cache entries (output folder and config) of `keep`'s world with another code hash, and those of
    keys without a world part (older layout), that no process holds a lock on; returns the keys deleted. The empty
    lock files stay, so that every process locks the same file."""
    world = keep.split('-')[0]
    removed = []
    for name in sorted(os.listdir(cache_root)):
        if not name.endswith('.lock'):
            continue
        key = name[:-len('.lock')]
        if key == keep or ('-' in key and key.split('-')[0] != world):
            continue
        stale = os.path.join(cache_root, key)
        if not os.path.exists(stale) and not os.path.exists(stale + '.yaml'):
            continue
        with open(stale + '.lock', 'a') as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use (being built or read) by another session
            shutil.rmtree(stale, ignore_errors=True)
            if os.path.exists(stale + '.yaml'):
                os.remove(stale + '.yaml')
        removed.append(key)
    return removed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_ranks(script: str, args: list, world_size: int = 2, threads: int = 1) -> list:
    """Start `script` once per rank as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set; gloo on
    CPU), each with stdout and stderr piped separately. Returns the Popen objects, rank order."""
    import subprocess
    import sys
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=port, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1',
                   PYTHONUNBUFFERED='1')
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs
