"""Where do a toy grounding run's wrong boxes go? Splits the Grad-CAM box choices of one evaluation.

    python -m tools.toy.grounding_errors --world data/toyworld --maps output/toy_grounding/result/epoch0.pth
    python -m tools.toy.grounding_errors ... --json                                      # one JSON line

`--maps` is a `result/epoch<E>.pth` file written by Grounding.py (the maps of every val/test expression, in the
order of the config's test files: refcoco+_val.json, then refcoco+_test.json). Each map picks a box as the
evaluation does (`evaluation.grounding_boxes.choose_box`, alpha 0.5), and the choice is sorted into: correct (IoU >= 0.5 with the
named object), a distractor box at the named object (its centre inside the object's box), another object, or the
background. 'objects only' is the accuracy when the map chooses among the image's true object boxes alone (how well
it tells the objects apart, whatever the distractors). Accuracies are also split by how the expression names its
object: by attributes, or by position among look-alikes ("the leftmost triangle"; see `python -m dataset.toyworld
--ceiling` for what a match score can reach there), and by the number of objects in the image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from dataset.toyworld import names_a_side
from tools.toy.report import missing_input

SPLITS = ('val', 'testA', 'testB')
OUTCOMES = ('correct', 'distractor at target', 'other object', 'background')


def _centre_inside(box, target) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return target[0] <= cx <= target[0] + target[2] and target[1] <= cy <= target[1] + target[3]


def analyse(world_dir: str, maps_path: str) -> dict:
    """Per split: counts, the share of each outcome, 'objects only' accuracy and accuracy by expression kind and by
    object count (all in %)."""
    import torch
    from evaluation.grounding_boxes import choose_box, computeIoU, upsample_heatmap
    from evaluation.grounding import load_dets, prepare_proposals
    from refTools.refer import REFER
    refer = REFER(world_dir, 'refcoco+', 'unc')
    items = []
    for name in ('refcoco+_val.json', 'refcoco+_test.json'):
        with open(os.path.join(world_dir, name), encoding='utf-8') as f:
            items += json.load(f)
    maps = torch.load(maps_path, weights_only=True)
    ref_ids = [int(r) for r in maps['ref_id']]
    dets = prepare_proposals(ref_ids, refer, load_dets(os.path.join(world_dir, 'refcoco+', 'dets.json')))
    tally = {s: defaultdict(lambda: [0, 0]) for s in SPLITS}  # key -> [hits, count]
    for index, ref_id, pred in zip(maps['index'].tolist(), ref_ids, maps['pred']):
        item = items[index]
        if int(item['ref_id']) != ref_id:
            raise ValueError(f'{maps_path}: map {index} is for ref_id {ref_id}, but item {index} of the val/test '
                             f'files is ref_id {item["ref_id"]} (maps from another world?)')
        ref = refer.Refs[ref_id]
        if ref['split'] not in tally:
            continue
        image = refer.Imgs[ref['image_id']]
        target = refer.refToAnn[ref_id]['bbox']
        objects = [a['bbox'] for a in refer.imgToAnns[ref['image_id']]]
        heat = upsample_heatmap(pred, image['height'], image['width'])
        box = choose_box(heat, dets[str(ref['image_id'])]).box
        if computeIoU(target, box) >= 0.5:
            outcome = 'correct'
        elif _centre_inside(box, target):
            outcome = 'distractor at target'
        elif any(_centre_inside(box, o) for o in objects):
            outcome = 'other object'
        else:
            outcome = 'background'
        correct = outcome == 'correct'
        kind = 'by position' if names_a_side(item['text']) else 'by attributes'
        t = tally[ref['split']]
        for key in (*OUTCOMES, 'objects only', kind, f'{len(objects)} objects'):
            hit = {'objects only': computeIoU(target, choose_box(heat, objects).box) >= 0.5}.get(
                key, outcome == key if key in OUTCOMES else correct)
            t[key][0] += int(hit)
            t[key][1] += 1
    out = {}
    for split, t in tally.items():
        n = t['correct'][1]
        if n:
            out[split] = {'n': n, **{k: round(100.0 * h / c, 1) for k, (h, c) in sorted(t.items())},
                          'counts': {k: c for k, (_, c) in sorted(t.items()) if k not in OUTCOMES}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--world', default='data/toyworld', help='toy world folder (default data/toyworld)')
    p.add_argument('--maps', required=True, help="a Grounding.py result/epoch<E>.pth file")
    p.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = p.parse_args(argv)
    if missing_input(((args.maps, '--maps'), (os.path.join(args.world, 'refcoco+', 'dets.json'), '--world'))):
        return 2
    result = analyse(args.world, args.maps)
    if args.json:
        print(json.dumps(result))
        return 0
    keys = [k for k in result[next(iter(result))] if k not in ('n', 'counts')] if result else []
    print(f"{'%':<22}" + ''.join(f'{s:>9}' for s in result))
    for key in ['n'] + keys:
        print(f'{key:<22}' + ''.join(f"{result[s].get(key, float('nan')):>9}" for s in result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
