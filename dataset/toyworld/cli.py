"""The toy world's command line: `python -m dataset.toyworld --out DIR [--seed S] [sizes] [--force] [--ceiling]`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dataset.toyworld.analysis import grounding_match_bound, retrieval_ceiling
from dataset.toyworld.world import DEFAULTS, FLAG, ToyWorldError, generate, read_manifest


def build_parser() -> argparse.ArgumentParser:
    """The command line: --out, --seed, one flag per size (dashes or underscores), --force, --debug."""
    p = argparse.ArgumentParser(prog='python -m dataset.toyworld',
                                description='Write the synthetic toy world (images + annotations of every task).')
    p.add_argument('--out', default='data/toyworld', help='output folder (default data/toyworld)')
    helps = {
        'seed': 'random seed (same seed and sizes => byte-identical files)',
        'image_size': 'image side in pixels',
        'train_images': 'images in the train pool', 'val_images': 'images in the val pool',
        'test_images': 'images in the test pool',
        'captions_per_image': 'captions per image (pretraining, retrieval)',
        'vqa_per_image': 'VQA questions per image (train and test pools)',
        'nlvr_per_image': 'NLVR statements per pool image', 've_per_image': 'SNLI-VE hypotheses per image',
        'refs_per_image': 'at most this many RefCOCO+ refs per image',
    }
    for key, default in DEFAULTS.items():
        names = [FLAG[key]] + (['--' + key] if '_' in key else [])
        p.add_argument(*names, dest=key, type=int, default=default, help=f'{helps[key]} (default {default})')
    p.add_argument('--force', action='store_true',
                   help='regenerate even if --out holds this world, or replace a toy world made with other arguments')
    p.add_argument('--ceiling', action='store_true',
                   help='print the best R@1 any model can reach on the retrieval val/test splits of --out (many '
                        'captions are true of several images) and what a match-score map can reach on grounding, '
                        'instead of generating')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line message for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    try:
        if ns.ceiling:
            if read_manifest(ns.out) is None:
                raise ToyWorldError(f'--out {ns.out}: not a toy world; generate it first')
            for split in ('val', 'test'):
                c = retrieval_ceiling(ns.out, split)
                print(f"{ns.out} retrieval {split}: {c['images']} images, {c['captions']} captions, "
                      f"{c['shared_captions']:.1f}% true of more than one image; best possible "
                      f"txt_r1 {c['txt_r1']:.1f}%, img_r1 {c['img_r1']:.1f}%")
            for split, g in grounding_match_bound(ns.out).items():
                print(f"{ns.out} grounding {split}: {g['expressions']} expressions, {g['positional']:.1f}% name "
                      f"the object by position among look-alikes; exact on the others and guessing among the "
                      f"look-alikes gives {g['bound']:.1f}%")
        else:
            generate(ns.out, force=ns.force, **{k: getattr(ns, k) for k in DEFAULTS})
    except ToyWorldError as e:
        if ns.debug:
            raise
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    return 0

