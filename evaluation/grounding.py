"""Weakly supervised grounding evaluation: Grad-CAM map per referring expression, best detection
proposal inside the map, IoU >= 0.5 with the ground-truth box, accuracy per RefCOCO+ split.

Pieces, from low to high level:

* `load_dets` - read dets.json ({str(image_id): [[x, y, w, h, ...], ...]}) with one-line errors;
* `prepare_proposals` - check that every evaluated expression has a REFER ref and proposals for its image, and clip
  proposal boxes to their image (a box partly outside is CLIPPED with one summary warning; a box entirely outside,
  or empty, is DROPPED with the same warning; an image left without proposals is an error);
* `proposal_statistics` - chance levels (random proposal, 1 / mean number of proposals) and the proposals' upper
  bound per split, to read the accuracies against;
* `compute_maps` - this rank's Grad-CAM maps, gathered from all ranks, each test item exactly once;
* `GroundingEvaluator` - evaluate_fn for engine.fit: maps -> `evaluation.grounding_boxes.grounding_eval` (box choice and IoU as
  the original) -> {'val_d', 'testA_d', 'testB_d'} for log.txt, full metrics in a readable JSON file, the maps of
  each evaluation in `<output_dir>/result/epoch<E>.pth`.

Differences from the original: work is split across ranks and gathered without the DistributedSampler's padded
duplicates (the original counted them); the merged maps are saved once by rank 0 instead of one file per
rank; the map grid follows image_res / patch_size instead of a hard-coded 24 x 24; the sentence map averages over
real tokens (see models/gradcam.py); proposals outside the image are clipped.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

import utils
from dataset.utils import DataError, read_json_file
from evaluation.grounding_boxes import computeIoU, grounding_eval
from evaluation.common import ResultsFile, batch_indices, build_eval_loaders, merge_shards
from models import gradcam

SPLITS = ('val', 'testA', 'testB')


# ----------------------------------------------------------------------------------------------------------------
# Detections
# ----------------------------------------------------------------------------------------------------------------
def load_dets(path: str) -> dict[str, list[list[float]]]:
    """Read a dets.json file: an object {str(image_id): [[x, y, w, h, ...], ...]} (extra numbers ignored)."""
    dets = read_json_file(path, 'det_file')
    if not isinstance(dets, dict):
        raise DataError(f'{path}: expected an object {{image_id: [[x, y, w, h], ...]}}, got {type(dets).__name__}')
    return dets


def _box(det, where: str) -> list[float]:
    if not isinstance(det, (list, tuple)) or len(det) < 4:
        raise DataError(f'{where}: a proposal must be a list [x, y, w, h, ...], got {det!r:.80}')
    try:
        box = [float(v) for v in det[:4]]
    except (TypeError, ValueError):
        raise DataError(f'{where}: proposal {det!r:.80} has non-numeric coordinates') from None
    if not all(math.isfinite(v) for v in box):
        raise DataError(f'{where}: proposal {det!r:.80} has non-finite coordinates')
    return box


def clip_box(box: Sequence[float], width: float, height: float) -> list[float] | None:
    """[x, y, w, h] clipped to the image [0, width] x [0, height]; None when nothing of it is inside."""
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[0] + box[2], float(width)), min(box[1] + box[3], float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def prepare_proposals(ref_ids: Sequence[int], refer, dets: Mapping, det_file: str = 'dets.json',
                      where=None) -> dict[str, list[list[float]]]:
    """Proposals for the images of `ref_ids`, validated and clipped to their image.

    `where(i)` names test item i in errors (e.g. 'refcoco+_val.json item 12'). Raises DataError for a ref_id that
    REFER does not know, an image without an entry in dets.json (or with an empty list, or with only boxes outside
    the image) and malformed boxes. Boxes partly outside the image are clipped to it and boxes entirely outside (or
    of zero size) are dropped, with one warning that counts both.
    """
    where = where or (lambda i: f'test item {i}')
    out: dict[str, list[list[float]]] = {}
    n_clipped = n_dropped = 0
    example = None
    for i, ref_id in enumerate(ref_ids):
        ref = refer.Refs.get(int(ref_id)) if hasattr(refer.Refs, 'get') else refer.Refs[int(ref_id)]
        if ref is None:
            raise DataError(f'{where(i)}: ref_id {ref_id} is not in the REFER refs')
        key = str(ref['image_id'])
        if key in out:
            continue
        if key not in dets:
            raise DataError(f'{det_file}: no entry for image_id {key} (ref_id {ref_id}, {where(i)})')
        raw = dets[key]
        if not isinstance(raw, list) or not raw:
            raise DataError(f'{det_file}: image_id {key} has no proposals (ref_id {ref_id}, {where(i)})')
        img = refer.Imgs[ref['image_id']]
        width, height = img['width'], img['height']
        boxes = []
        for k, det in enumerate(raw):
            box = _box(det, f'{det_file} image_id {key} proposal {k}')
            clipped = clip_box(box, width, height) if box[2] > 0 and box[3] > 0 else None
            if clipped is None:
                n_dropped += 1
                example = example or f'image_id {key} box {box} in a {width}x{height} image'
                continue
            if clipped != box:
                n_clipped += 1
                example = example or f'image_id {key} box {box} in a {width}x{height} image'
            boxes.append(clipped)
        if not boxes:
            raise DataError(f'{det_file}: every proposal of image_id {key} lies outside its {width}x{height} image '
                            f'(ref_id {ref_id}, {where(i)})')
        out[key] = boxes
    if n_clipped or n_dropped:
        warnings.warn(f'{det_file}: {n_clipped} proposal box(es) extend outside their image and were clipped to it, '
                      f'{n_dropped} lie entirely outside (or are empty) and were dropped; first: {example}',
                      stacklevel=2)
    return out


def proposal_statistics(ref_ids: Sequence[int], refer, dets: Mapping) -> dict:
    """Per split (and 'all'): number of evaluated expressions, mean number of proposals, chance accuracies and the
    upper bound that the proposals allow.

    chance_inv_mean_proposals = 1 / mean number of proposals; chance_random_proposal = expected accuracy of picking
    a proposal uniformly at random (mean over expressions of #proposals with IoU >= 0.5 / #proposals);
    upper_bound = fraction of expressions with at least one proposal of IoU >= 0.5.
    """
    acc: dict[str, dict[str, float]] = {}
    for ref_id in ref_ids:
        ref = refer.Refs[int(ref_id)]
        gt = refer.refToAnn[int(ref_id)]['bbox']
        boxes = dets[str(ref['image_id'])]
        good = sum(computeIoU(gt, b[:4]) >= 0.5 for b in boxes)
        for split in (ref['split'], 'all'):
            s = acc.setdefault(split, {'n': 0, 'proposals': 0.0, 'random': 0.0, 'covered': 0.0})
            s['n'] += 1
            s['proposals'] += len(boxes)
            s['random'] += good / len(boxes)
            s['covered'] += good > 0
    out = {}
    for split, s in acc.items():
        n = s['n']
        mean_p = s['proposals'] / n
        out[split] = {'n': n, 'mean_proposals': mean_p, 'chance_inv_mean_proposals': 1.0 / mean_p,
                      'chance_random_proposal': s['random'] / n, 'upper_bound': s['covered'] / n}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------------------------
def compute_maps(model, loader, tokenizer, device: torch.device, mode: str, block_num: int | None,
                 sentence_average: str = 'real', print_freq: int = 50, header: str = 'Grounding') -> dict:
    """Grad-CAM sentence maps of every item of `loader.dataset` (items (image, text, ref_id)), from all ranks.

    Returns {'index': [N] dataset indices in order, 'ref_id': [N], 'pred': float32 array [N, gh, gw]}; each index
    appears exactly once (the sampler's padded repeats are dropped), on every rank.
    """
    index_batches = batch_indices(loader)
    max_len = int(model.text_encoder.config.max_position_embeddings)
    local = {'index': [], 'ref_id': [], 'pred': []}
    logger = utils.MetricLogger(window_size=50)
    for indices, (images, texts, ref_ids) in logger.log_every(zip(index_batches, loader), print_freq, header,
                                                               total=len(index_batches)):
        text = tokenizer(list(texts), padding='longest', truncation=True, max_length=max_len, return_tensors='pt')
        out = gradcam.compute_gradcam(model, mode, images.to(device, non_blocking=True), text.input_ids.to(device),
                                      text.attention_mask.to(device), block_num, sentence_average)
        if mode == 'itm':
            logger.update(itm_prob=float(out.itm_prob.mean()))
        local['index'] += indices
        local['ref_id'] += [int(r) for r in ref_ids]
        local['pred'].append(out.sentence_maps)
    local['pred'] = (np.concatenate(local['pred']) if local['pred']
                     else np.zeros((0,) + gradcam.patch_grid(model), np.float32))
    return merge_map_shards(utils.all_gather_object(local), len(loader.dataset), header)


def merge_map_shards(shards: Sequence[Mapping], expected: int, header: str = 'Grounding') -> dict:
    """Union of the ranks' {'index', 'ref_id', 'pred'} results: each dataset index once (DistributedSampler pads
    shards with repeats of the first indices; they are dropped), sorted by index. Raises RuntimeError unless the
    union is exactly indices 0 .. expected - 1."""
    merged = merge_shards(shards, ('ref_id', 'pred'))
    order = merged['index']
    if order != list(range(expected)):
        raise RuntimeError(f'{header}: maps cover {len(order)} distinct items, expected indices 0..{expected - 1}')
    preds = (np.stack(merged['pred']).astype(np.float32, copy=False) if order
             else np.zeros((0,) + tuple(np.shape(shards[0]['pred'])[1:]), np.float32))
    return {'index': order, 'ref_id': [int(r) for r in merged['ref_id']], 'pred': preds}


# ----------------------------------------------------------------------------------------------------------------
# The evaluator the script uses
# ----------------------------------------------------------------------------------------------------------------
class GroundingEvaluator:
    """evaluate_fn for engine.fit (and --evaluate): Grad-CAM maps -> box accuracy per split.

    Calling it with an epoch returns the log.txt record {'val_d', 'testA_d', 'testB_d'} (fractions, as the
    original), identical on every rank. The readable JSON `results_path` keeps every evaluation under 'epochs'
    (accuracies, counts, chance levels, proposal upper bound, Grad-CAM settings); `finish` adds the best epoch.
    """

    def __init__(self, model, dataset, tokenizer, device: torch.device, refer, dets: Mapping, *, mode: str = 'itm',
                 block_num: int | None = None, sentence_average: str = 'real', batch_size: int = 32,
                 num_workers: int = 0, output_dir: str | None = None, det_file: str = 'dets.json',
                 resume: bool = False, print_freq: int = 50):
        self.model, self.dataset, self.tokenizer, self.device = model, dataset, tokenizer, device
        self.refer, self.mode, self.sentence_average = refer, mode, sentence_average
        self.block_num = gradcam.check_block_num(model, mode, block_num)
        self.output_dir, self.print_freq = output_dir, print_freq
        ref_ids = [int(a['ref_id']) for a in dataset.ann]
        where = dataset.ann.where if hasattr(dataset.ann, 'where') else None
        self.dets = prepare_proposals(ref_ids, refer, dets, det_file, where)
        self.stats = proposal_statistics(ref_ids, refer, self.dets)
        self.loader = build_eval_loaders([dataset], batch_size, num_workers)[0]
        self.results_path = os.path.join(output_dir, 'grounding_results.json') if output_dir else None
        self.file = ResultsFile(self.results_path, {'gradcam_mode': mode, 'block_num': self.block_num,
                                                    'sentence_average': sentence_average, 'proposals': self.stats},
                                resume=resume)
        self.results = self.file.data

    def run(self, label: str) -> dict:
        """Evaluate once; store the metrics under `label` and return them (same on every rank)."""
        maps = compute_maps(self.model, self.loader, self.tokenizer, self.device, self.mode, self.block_num,
                            self.sentence_average, self.print_freq, header=f'Grounding [{label}]')
        metrics = None
        if utils.is_main_process():
            results = [{'ref_id': r, 'pred': p} for r, p in zip(maps['ref_id'], maps['pred'])]
            acc = grounding_eval(results, self.dets, None, self.refer, alpha=0.5,
                                 mask_size=int(maps['pred'].shape[-1]))
            metrics = {**acc, 'n': {s: self.stats.get(s, {}).get('n', 0) for s in SPLITS}}
            if self.output_dir:
                utils.atomic_save({'index': torch.tensor(maps['index']), 'ref_id': torch.tensor(maps['ref_id']),
                                   'pred': torch.from_numpy(maps['pred'])},
                                  os.path.join(self.output_dir, 'result', f'epoch{label}.pth'))
        metrics = utils.all_gather_object(metrics)[0]  # every rank must agree on "best improved" (barriers follow)
        self.file.add(label, metrics)
        return metrics

    def __call__(self, epoch: int) -> dict:
        m = self.run(str(epoch))
        return {f'{s}_d': m[f'{s}_d'] for s in SPLITS}

    def finish(self, best_epoch: int | None) -> None:
        """Record the best epoch (by val_d, chosen by engine.fit) and its metrics in the results file."""
        self.file.finish(best_epoch)
