"""Making a toy world: the generator's arguments, the orchestration of the writers into a temporary folder that is
swapped into place, the manifest, and reading or verifying an existing world."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from dataset.toyworld import writers
from dataset.toyworld.scene import POOLS
from dataset.toyworld.snli_ve import VE_LABELS
from dataset.toyworld.vocab import VOCAB_SIZE
from utils import UserError

FORMAT_VERSION = 1
GENERATOR = 'dataset.toyworld'


class ToyWorldError(UserError, ValueError):
    """Bad arguments for the generator or an --out folder that must not be touched (message: one line)."""


DEFAULTS = {
    'seed': 0,
    'image_size': 96,
    'train_images': 2400,
    'val_images': 300,
    'test_images': 300,
    'captions_per_image': 5,
    'vqa_per_image': 4,
    'nlvr_per_image': 2,
    've_per_image': 3,
    'refs_per_image': 2,
}
FLAG = {k: '--' + k.replace('_', '-') for k in DEFAULTS}


def _check_args(args: dict) -> None:
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ToyWorldError(f'{FLAG[key]} must be an integer, got {value!r}')
    if args['image_size'] < 48:
        raise ToyWorldError(f"--image-size must be >= 48 (4 objects must fit), got {args['image_size']}")
    if args['image_size'] > 1024:
        raise ToyWorldError(f"--image-size must be <= 1024, got {args['image_size']}")
    for key in ('train_images', 'val_images', 'test_images', 'captions_per_image'):
        if args[key] < 2:
            raise ToyWorldError(f'{FLAG[key]} must be >= 2, got {args[key]}')
    for key in ('vqa_per_image', 'nlvr_per_image', 've_per_image', 'refs_per_image'):
        if args[key] < 1:
            raise ToyWorldError(f'{FLAG[key]} must be >= 1, got {args[key]}')
    if args['seed'] < 0:
        raise ToyWorldError(f"--seed must be >= 0, got {args['seed']}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()



def _write_world(out: str, prefix: str, args: dict) -> dict:
    """Generate everything into the (empty) folder `out`; `prefix` is the --out spelling used in the
    pretraining image paths. Returns the counts for the summary."""
    for folder in ('images', 'vocab', 'refcoco+'):
        os.makedirs(os.path.join(out, folder))
    images = writers.draw_images(out, args)
    by_pool = {p: [w for w in images if w['split'] == p] for p in POOLS}
    writers.write_vocab(out)
    writers.write_ground_truth(out, images, args['image_size'])
    counts: dict = {'images': {p: args[f'{p}_images'] for p in POOLS}}
    counts.update(writers.write_captions(out, prefix, images, by_pool, args))
    counts.update(writers.write_vqa(out, by_pool, args, FORMAT_VERSION))
    counts.update(writers.write_nlvr(out, by_pool, args))
    counts.update(writers.write_ve(out, by_pool, args))
    counts.update(writers.write_refcoco(out, images, args))
    return counts


ANNOTATION_FILES = (
    'vocab/vocab.txt', 'world.json', 'pretrain.json', 'nlvr_pretrain.json', 'retrieval_train.json',
    'retrieval_val.json', 'retrieval_test.json', 'vqa_train.json', 'vqa_test.json', 'answer_list.json',
    'vqa_test_questions.json', 'vqa_test_annotations.json', 'nlvr_train.json', 'nlvr_dev.json', 'nlvr_test.json',
    've_train.json', 've_dev.json', 've_test.json', 'refcoco+_train.json', 'refcoco+_val.json',
    'refcoco+_test.json', 'refcoco+/refs(unc).p', 'refcoco+/instances.json', 'refcoco+/dets.json',
    'refcoco+/cocos.json',
)


def read_world(world_dir: str) -> list:
    """The world.json entries of a toy world: per image its file, split, size and objects (shape, colour, size,
    box)."""
    path = os.path.join(world_dir, 'world.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: not found; is {world_dir} a toy world (python -m dataset.toyworld)?')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def read_manifest(out: str):
    """The manifest of an existing toy world, or None when `out` holds no (readable) toy world."""
    path = os.path.join(out, 'manifest.json')
    try:
        with open(path, encoding='utf-8') as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get('generator') != GENERATOR or not isinstance(m.get('args'), dict):
        return None
    return m


def _verify(out: str, manifest: dict) -> str | None:
    """Name of the first file of the world that is missing or changed, else None."""
    for rel, digest in manifest.get('files', {}).items():
        path = os.path.join(out, rel)
        if not os.path.isfile(path) or _sha256(path) != digest:
            return rel
    n_images = sum(manifest['args'].get(f'{p}_images', 0) for p in POOLS)
    images = os.path.join(out, 'images')
    if not os.path.isdir(images) or len(os.listdir(images)) != n_images:
        return 'images/'
    return None


def format_summary(out: str, manifest: dict) -> str:
    """The summary table (counts per split and task) of a generated world."""
    a, c = manifest['args'], manifest['counts']
    g, gs = c['grounding_refs'], c['grounding_sents']
    total_nlvr = sum(c['nlvr'].values())
    ve = c['ve_labels']
    n_ve = sum(ve.values()) or 1
    rows = [
        ('images', 'image', c['images']['train'], c['images']['val'], c['images']['test'],
         f"{a['image_size']}x{a['image_size']} px, 1-4 objects"),
        ('pretrain', 'image', c['pretrain']['train'], '-', '-', f"{a['captions_per_image']} captions each"),
        ('nlvr_pretrain', 'image', c['nlvr_pretrain']['train'], '-', '-', '1 caption each'),
        ('retrieval', 'caption', c['retrieval']['train'], c['retrieval']['val'], c['retrieval']['test'],
         f"{a['captions_per_image']} per image"),
        ('vqa', 'question', c['vqa']['train'], '-', c['vqa']['test'], f"{c['vqa_answers']} answers in answer_list"),
        ('nlvr', 'statement', c['nlvr']['train'], c['nlvr']['val'], c['nlvr']['test'],
         f"True {100.0 * c['nlvr_true'] / max(total_nlvr, 1):.1f}%"),
        ('ve', 'hypothesis', c['ve']['train'], c['ve']['val'], c['ve']['test'],
         'E/N/C ' + '/'.join(f'{100.0 * ve[k] / n_ve:.1f}' for k in VE_LABELS) + '%'),
        ('grounding', 'ref', g['train'], g['val'], g['testA'] + g['testB'],
         f"test = testA {g['testA']} (big) + testB {g['testB']} (small)"),
        ('grounding', 'sentence', gs['train'], gs['val'], gs['testA'] + gs['testB'], ''),
    ]
    head = ('task', 'unit', 'train', 'val', 'test', 'notes')
    lines = [f"toy world at {out}: seed {a['seed']}, vocab {manifest['vocab_size']} tokens",
             f'{head[0]:<14}{head[1]:<11}{head[2]:>7}{head[3]:>7}{head[4]:>7}  {head[5]}']
    for r in rows:
        lines.append(f'{r[0]:<14}{r[1]:<11}{r[2]!s:>7}{r[3]!s:>7}{r[4]!s:>7}  {r[5]}'.rstrip())
    return '\n'.join(lines)


def generate(out: str, force: bool = False, verbose: bool = True, **kwargs) -> dict:
    """Write a toy world to `out` (see the package docstring) and return its manifest.

    Keyword arguments are the DEFAULTS keys (seed, image_size, train_images, ...). An existing world made with
    the same arguments is reused (unless `force`); anything else already in `out` raises ToyWorldError and is
    left untouched (`force` replaces a toy world made with other arguments, never foreign data).
    """
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise ToyWorldError(f'unknown toy world argument {sorted(unknown)[0]!r}')
    args = dict(DEFAULTS, **kwargs)
    _check_args(args)
    out_norm = os.path.normpath(out)

    if os.path.lexists(out_norm) and not os.path.isdir(out_norm):
        raise ToyWorldError(f'--out {out}: exists and is not a directory; refusing to touch it')
    if os.path.isdir(out_norm) and os.listdir(out_norm):
        manifest = read_manifest(out_norm)
        if manifest is None:
            first = sorted(os.listdir(out_norm))[0]
            raise ToyWorldError(f"--out {out}: not empty and not a toy world (holds '{first}'); refusing to "
                                f'overwrite it, choose another --out')
        old = dict(manifest['args'])
        if manifest.get('format_version') != FORMAT_VERSION:
            diff = 'format version'
            detail = f"format version {manifest.get('format_version')} (this generator writes {FORMAT_VERSION})"
        else:
            diff = next((k for k in DEFAULTS if old.get(k) != args[k]), None)
            detail = f'{FLAG[diff]} {old.get(diff)} (asked for {args[diff]})' if diff else ''
        if diff and not force:
            raise ToyWorldError(f'--out {out}: holds a toy world made with {detail}; choose another --out, '
                                f'delete it, or pass --force to replace it')
        if not diff and not force:
            bad = _verify(out_norm, manifest)
            if bad is not None:
                raise ToyWorldError(f'--out {out}: toy world is incomplete or modified ({bad}); pass --force '
                                    f'to regenerate it')
            if verbose:
                print(f'{out}: up to date (same arguments), nothing regenerated; pass --force to regenerate')
                print(format_summary(out, manifest))
            return manifest

    parent = os.path.dirname(os.path.abspath(out_norm))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_norm))}.tmp-{os.getpid()}')
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    start = time.perf_counter()
    try:
        counts = _write_world(tmp, out_norm, args)
        manifest = {'generator': GENERATOR, 'format_version': FORMAT_VERSION, 'args': args,
                    'vocab_size': VOCAB_SIZE, 'image_prefix': os.path.join(out_norm, 'images'),
                    'counts': counts, 'files': {rel: _sha256(os.path.join(tmp, rel)) for rel in ANNOTATION_FILES}}
        writers.dump_json(os.path.join(tmp, 'manifest.json'), manifest)
        # Swap into place only now: an interrupted run leaves --out as it was.
        if os.path.isdir(out_norm):
            if os.listdir(out_norm):
                old_dir = tmp + '.old'
                os.rename(out_norm, old_dir)
                os.rename(tmp, out_norm)
                shutil.rmtree(old_dir)
            else:
                os.rmdir(out_norm)
                os.rename(tmp, out_norm)
        else:
            os.rename(tmp, out_norm)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if verbose:
        print(format_summary(out, manifest))
        print(f'generated in {time.perf_counter() - start:.1f} s')
    return manifest

