"""Does a toy model's Grad-CAM point at the right thing? Peak-cell localisation shares on held-out toy images.

    python -m tools.toy.gradcam_localisation --checkpoint output/toy_demo/grounding/checkpoint_best.pth \
        --world data/toyworld                       # table
    python -m tools.toy.gradcam_localisation ... --json              # one JSON object
    python -m tools.toy.gradcam_localisation ... --block_num 3 --limit 200

Every RefCOCO+ expression of the world's held-out splits (val, testA, testB: the val and test pools' images) gets
ITM Grad-CAM maps (models/gradcam.py, as Predict.py draws them: one per word, word pieces merged, and one for
the whole expression). A map "points at" the cell of the patch grid where it is largest (its peak; a map that is
the same everywhere, e.g. all zero, points nowhere and counts as a miss). A cell lies on an object when the cell's
centre, mapped to the image's pixels, lies inside the object's box (world.json; boxes of different objects never
overlap, so a cell is on at most one object): the pointing game at the resolution of the patch grid. `--rule
overlap` counts every cell that the box covers in part (a peak on an object's edge; chance rises with it).
Reported:

  colour_word             per-word maps of colour words ('red') whose peak lies on an object of that colour
  shape_word              per-word maps of shape words ('circle') whose peak lies on an object of that shape
  whole_attribute_named   whole-expression maps peaking on the referred object, expressions that name it by its
                          attributes ('the big red circle')
  whole_position_named    the same for expressions that name it by position among look-alikes ('the leftmost
                          triangle'; `dataset.toyworld.names_a_side`): a match score cannot tell the look-alikes
                          apart, see `python -m dataset.toyworld --out W --ceiling`

each as a percentage with its chance level (the hit rate of a peak drawn uniformly among the cells: the share of
cells lying on a qualifying object, averaged over the maps) and the number of maps counted (n). `--json` prints
one JSON object {name: {value, chance, n}} with exactly these four names.

At the last fusion layer (`--block_num 3` on the toy model) only the [CLS] query reaches the ITM head: every word's
map is zero there, so the word shares are 0 by construction (see models/gradcam.default_block_num).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from dataset.toyworld import COLOUR_NAMES, SHAPES, names_a_side

MEASURES = ('colour_word', 'shape_word', 'whole_attribute_named', 'whole_position_named')
HELD_OUT_SPLITS = ('val', 'testA', 'testB')


# ----------------------------------------------------------------------------------------------------------------
# The arithmetic: peak cell, cells on boxes, hit, chance
# ----------------------------------------------------------------------------------------------------------------
def peak_cell(grid_map: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the largest cell of a [gh, gw] map (the first in row-major order on ties), or None when the
    map is the same everywhere (all zero, say): such a map points nowhere."""
    m = np.asarray(grid_map, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f'peak_cell: expected a non-empty [gh, gw] map, got shape {m.shape}')
    if not np.all(np.isfinite(m)) or m.max() == m.min():
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(r), int(c)


def cell_cover(boxes: Iterable[Sequence[float]], grid: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Float [gh, gw]: the share of each patch-grid cell's area that the union of `boxes` covers ([x, y, w, h] in
    pixels; box pixels x .. x + w - 1, i.e. the interval [x, x + w)). Cell (r, c) covers image rows
    r * H / gh .. (r + 1) * H / gh: the model sees the whole image resized to its grid (the test transform neither
    crops nor pads)."""
    boxes = [tuple(float(v) for v in b[:4]) for b in boxes]
    gh, gw = grid
    h, w = image_hw
    # Exact areas on the grid made of every cell edge and box edge (boxes of one image never overlap in the toy
    # world, but a union is computed anyway).
    ys = np.unique(np.concatenate([np.arange(gh + 1) * (h / gh)] + [[b[1], b[1] + b[3]] for b in boxes]))
    xs = np.unique(np.concatenate([np.arange(gw + 1) * (w / gw)] + [[b[0], b[0] + b[2]] for b in boxes]))
    ys, xs = ys[(ys >= 0) & (ys <= h)], xs[(xs >= 0) & (xs <= w)]
    cover = np.zeros((gh, gw))
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            my, mx = (y0 + y1) / 2, (x0 + x1) / 2
            if any(b[0] <= mx < b[0] + b[2] and b[1] <= my < b[1] + b[3] for b in boxes):
                r, c = min(int(my * gh / h), gh - 1), min(int(mx * gw / w), gw - 1)
                cover[r, c] += (y1 - y0) * (x1 - x0)
    return cover / ((h / gh) * (w / gw))


RULES = ('centre', 'overlap')


def cells_on_boxes(boxes: Iterable[Sequence[float]], grid: tuple[int, int], image_hw: tuple[int, int],
                   rule: str = 'centre') -> np.ndarray:
    """Bool [gh, gw]: the cells that lie on one of `boxes` ([x, y, w, h] in pixels, pixels x .. x + w - 1).

    rule 'centre' (the default): the cell's centre, mapped to the image (height, width), lies inside a box
    (x <= centre < x + w), the pointing game at the resolution of the patch grid; cell (r, c) has its centre at
    ((c + 0.5) * W / gw, (r + 0.5) * H / gh). rule 'overlap': a box covers any part of the cell (`cell_cover` > 0),
    so a peak on a cell that holds only an object's edge counts too (and chance rises with it).
    """
    boxes = [tuple(float(v) for v in b[:4]) for b in boxes]
    if rule == 'overlap':
        return cell_cover(boxes, grid, image_hw) > 0
    if rule != 'centre':
        raise ValueError(f"cells_on_boxes: rule must be one of {', '.join(RULES)}, got {rule!r}")
    gh, gw = grid
    h, w = image_hw
    cy = (np.arange(gh) + 0.5) * (h / gh)
    cx = (np.arange(gw) + 0.5) * (w / gw)
    on = np.zeros((gh, gw), dtype=bool)
    for x, y, bw, bh in boxes:
        rows = (cy >= y) & (cy < y + bh)
        cols = (cx >= x) & (cx < x + bw)
        on |= rows[:, None] & cols[None, :]
    return on


def peak_hits(grid_map: np.ndarray, on: np.ndarray) -> bool:
    """Whether the map's peak cell is one of the `on` cells (False for a map without a peak)."""
    peak = peak_cell(grid_map)
    if np.shape(on) != np.shape(grid_map):
        raise ValueError(f'peak_hits: map {np.shape(grid_map)} and cells {np.shape(on)} differ in shape')
    return peak is not None and bool(on[peak])


def chance(on: np.ndarray) -> float:
    """Hit rate of a peak drawn uniformly among the cells: the share of `on` cells."""
    return float(np.mean(np.asarray(on, dtype=np.float64)))


@dataclass
class Tally:
    """Hits, summed chance and count of one measure."""
    hits: int = 0
    chance: float = 0.0
    n: int = 0

    def add(self, grid_map: np.ndarray, on: np.ndarray) -> bool:
        hit = peak_hits(grid_map, on)
        self.hits += hit
        self.chance += chance(on)
        self.n += 1
        return hit

    def report(self) -> dict:
        """{'value', 'chance'} in % (one decimal; None when nothing was counted) and 'n'."""
        if not self.n:
            return {'value': None, 'chance': None, 'n': 0}
        return {'value': round(100.0 * self.hits / self.n, 1), 'chance': round(100.0 * self.chance / self.n, 1),
                'n': self.n}


# ----------------------------------------------------------------------------------------------------------------
# The held-out expressions and their objects
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Expression:
    """One held-out referring expression with the ground truth of its image."""
    image_path: str
    image_hw: tuple[int, int]
    text: str                       # as in refcoco+_{val,test}.json (normalised by pre_caption before tokenising)
    split: str                      # val / testA / testB
    target: dict                    # the referred object: {'shape', 'colour', 'size', 'box'}
    objects: list = field(default_factory=list)  # every object of the image (world.json)

    @property
    def by_position(self) -> bool:
        return names_a_side(self.text)


def load_expressions(world_dir: str, limit: int | None = None) -> list[Expression]:
    """The expressions of the val / testA / testB refs of a toy world, image by image in image_id order (at most
    `limit` images). Objects come from world.json; the referred one is the ref's annotation (instances.json),
    found among them by its box."""
    from dataset.toyworld import read_world
    from refTools.refer import REFER
    worlds = {w['image_id']: w for w in read_world(world_dir)}
    refer = REFER(world_dir, 'refcoco+', 'unc')
    by_image: dict[int, list] = {}
    for ref in refer.Refs.values():
        if ref['split'] in HELD_OUT_SPLITS:
            by_image.setdefault(int(ref['image_id']), []).append(ref)
    out = []
    for n, image_id in enumerate(sorted(by_image)):
        if limit is not None and n >= limit:
            break
        w = worlds[image_id]
        h, wd = w['size'][1], w['size'][0]
        for ref in sorted(by_image[image_id], key=lambda r: r['ref_id']):
            box = [float(v) for v in refer.refToAnn[ref['ref_id']]['bbox']]
            targets = [o for o in w['objects'] if [float(v) for v in o['box']] == box]
            if len(targets) != 1:
                raise ValueError(f"{world_dir}: ref {ref['ref_id']}'s box {box} is not one object of image "
                                 f"{w['file']} in world.json (another world's annotations?)")
            for sent in ref['sentences']:
                out.append(Expression(os.path.join(world_dir, 'images', w['file']), (h, wd), sent['raw'],
                                      ref['split'], targets[0], list(w['objects'])))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring maps
# ----------------------------------------------------------------------------------------------------------------
def score_expression(tallies: dict, expr: Expression, words: Sequence[str], word_maps: np.ndarray,
                     sentence_map: np.ndarray, rule: str = 'centre') -> None:
    """Add one expression's maps to `tallies` ({measure: Tally}); `rule` as in `cells_on_boxes`."""
    grid = tuple(np.shape(sentence_map))
    for word, m in zip(words, word_maps):
        if word in COLOUR_NAMES:
            on = cells_on_boxes([o['box'] for o in expr.objects if o['colour'] == word], grid, expr.image_hw, rule)
            tallies['colour_word'].add(m, on)
        elif word in SHAPES:
            on = cells_on_boxes([o['box'] for o in expr.objects if o['shape'] == word], grid, expr.image_hw, rule)
            tallies['shape_word'].add(m, on)
    on = cells_on_boxes([expr.target['box']], grid, expr.image_hw, rule)
    tallies['whole_position_named' if expr.by_position else 'whole_attribute_named'].add(sentence_map, on)


def new_tallies() -> dict:
    return {k: Tally() for k in MEASURES}


def gradcam_maps(predictor, expressions: Sequence[Expression], block_num: int | None = None,
                 batch_size: int = 64):
    """Yield (expression, words, word_maps [W, gh, gw], sentence_map [gh, gw]) for each expression: ITM Grad-CAM
    of `predictor`'s model (a Predict.Predictor) as Predict.py computes it, batched over expressions."""
    import torch
    from dataset.utils import open_image_rgb, pre_caption
    from models import gradcam
    model, tokenizer = predictor.model, predictor.tokenizer
    block = gradcam.check_block_num(model, 'itm', predictor.block_num if block_num is None else block_num)
    max_len = int(model.text_encoder.config.max_position_embeddings)
    device = next(model.parameters()).device
    cache: dict[str, torch.Tensor] = {}
    for start in range(0, len(expressions), batch_size):
        chunk = expressions[start:start + batch_size]
        for e in chunk:
            if e.image_path not in cache:
                cache[e.image_path] = predictor.transform(open_image_rgb(e.image_path, '--world image'))
        images = torch.stack([cache[e.image_path] for e in chunk]).to(device)
        texts = [pre_caption(e.text, 30) for e in chunk]
        tok = tokenizer(texts, padding='longest', truncation=True, max_length=max_len, return_tensors='pt')
        res = gradcam.itm_gradcam(model, images, tok.input_ids.to(device), tok.attention_mask.to(device), block)
        for k, e in enumerate(chunk):
            length = int(tok.attention_mask[k].sum())
            tokens = tokenizer.convert_ids_to_tokens(tok.input_ids[k, :length].tolist())
            words, word_maps = gradcam.merge_word_pieces(tokens, res.token_maps[k, :length])
            yield e, words, word_maps, res.sentence_maps[k]
        if len(cache) > 4 * batch_size:  # expressions come image by image: older images are done
            cache.clear()


def measure(checkpoint: str, world_dir: str, config: str | None = None, limit: int | None = None,
            block_num: int | None = None, device: str = 'cpu', batch_size: int = 64,
            rule: str = 'centre') -> tuple[dict, dict]:
    """({measure: {'value', 'chance', 'n'}}, info) for a grounding / retrieval checkpoint on a toy world.
    info: the fusion layer explained, the numbers of images and expressions."""
    from Predict import Predictor
    predictor = Predictor(checkpoint, config, device, block_num, text_encoder=os.path.join(world_dir, 'vocab'))
    expressions = load_expressions(world_dir, limit)
    tallies = new_tallies()
    for e, words, word_maps, sentence_map in gradcam_maps(predictor, expressions, predictor.block_num, batch_size):
        score_expression(tallies, e, words, word_maps, sentence_map, rule)
    grid = predictor.model.visual_encoder.patch_embed.grid_size
    info = {'block_num': predictor.block_num, 'rule': rule, 'images': len({e.image_path for e in expressions}),
            'expressions': len(expressions), 'grid': [int(grid[0]), int(grid[1])]}
    return {k: t.report() for k, t in tallies.items()}, info


DESCRIPTIONS = {
    'colour_word': 'colour word -> an object of that colour',
    'shape_word': 'shape word -> an object of that shape',
    'whole_attribute_named': 'whole expression -> the object (named by attributes)',
    'whole_position_named': 'whole expression -> the object (named by position)',
}


def format_table(result: dict, info: dict | None = None) -> str:
    lines = []
    if info:
        rule = {'centre': "cell centre in the object's box", 'overlap': "cell overlapping the object's box"}
        lines.append(f"Grad-CAM (ITM, fusion layer {info['block_num']}, {info['grid'][0]}x{info['grid'][1]} cells) "
                     f"peak on the right object ({rule[info.get('rule', 'centre')]}): {info['expressions']} "
                     f"held-out expressions on {info['images']} images")
    lines += ['| measure | what | share % | chance % | maps |', '| --- | --- | --- | --- | --- |']
    for k in MEASURES:
        r = result[k]
        fmt = (lambda v: '-' if v is None else f'{v:.1f}')
        lines.append(f"| {k} | {DESCRIPTIONS[k]} | {fmt(r['value'])} | {fmt(r['chance'])} | {r['n']} |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', required=True, help='a toy grounding (or retrieval) checkpoint')
    p.add_argument('--world', default='data/toyworld', help='toy world folder (default data/toyworld)')
    p.add_argument('--config', default=None, help="model config (default: the checkpoint's own)")
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    p.add_argument('--limit', default=None, type=int, help='at most this many held-out images (default all)')
    p.add_argument('--block_num', default=None, type=int,
                   help="fusion (BERT) layer to explain (default: Predict.py's, fusion_layer + 2 or the last but one)")
    p.add_argument('--rule', default='centre', choices=RULES,
                   help="when a peak cell lies on an object: its centre is inside the object's box (centre, the "
                        "default), or the box covers any part of it (overlap)")
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch_size', default=64, type=int)
    args = p.parse_args(argv)
    from tools.toy.report import missing_input
    if missing_input(((args.checkpoint, '--checkpoint'), (os.path.join(args.world, 'world.json'), '--world'))):
        return 2
    if args.limit is not None and args.limit < 1:
        print('error: --limit must be >= 1', file=sys.stderr)
        return 2
    import utils
    try:
        result, info = measure(args.checkpoint, args.world, args.config, args.limit, args.block_num, args.device,
                               args.batch_size, args.rule)
    except utils.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result, info))
    return 0


if __name__ == '__main__':
    sys.exit(main())
