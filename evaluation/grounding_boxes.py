"""Box selection of weakly supervised grounding: IoU, proposal scores from a heatmap, and box accuracy per split
as the original evaluates them."""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from dataset.errors import DataError


def computeIoU(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes exactly as the original evaluates it.

    The intersection uses inclusive pixel corners (x2 = x + w - 1) and counts (x2 - x1 + 1)(y2 - y1 + 1) only when
    x1 < x2 and y1 < y2 (boxes sharing a single row/column count as disjoint); the union uses the plain areas
    w*h. Both quirks are kept so accuracies match the published numbers.
    """
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def proposal_scores(heatmap, proposals: Iterable[Sequence[float]], alpha: float = 0.5) -> np.ndarray:
    """Score each [x, y, w, h, ...] proposal on a heat map already at image size: region sum / (w*h)**alpha.

    The region is rows int(y) .. int(y+h)-1 and columns int(x) .. int(x+w)-1 (as the original slices). Starts
    below 0 are clamped to 0 (the original's negative slice start would wrap around). Proposals with w*h <= 0
    score -inf instead of dividing by zero.
    """
    m = np.asarray(heatmap.detach().cpu() if hasattr(heatmap, 'detach') else heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f'heatmap must be 2-D [H, W], got shape {m.shape}')
    scores = []
    for det in proposals:
        x, y, w, h = (float(v) for v in det[:4])
        area = w * h
        if area <= 0:
            scores.append(-np.inf)
            continue
        r0, r1 = max(int(y), 0), max(int(y + h), 0)
        c0, c1 = max(int(x), 0), max(int(x + w), 0)
        scores.append(m[r0:r1, c0:c1].sum() / area ** alpha)
    return np.asarray(scores, dtype=np.float64)


class BoxChoice(NamedTuple):
    index: int          # position of the chosen proposal
    box: list           # its [x, y, w, h]
    score: float        # its score
    fallback: bool      # True when no proposal scored > 0 (the original would have reused a stale box)


def choose_box(heatmap, proposals: Sequence[Sequence[float]], alpha: float = 0.5) -> BoxChoice:
    """Pick the proposal with the highest `proposal_scores` value.

    The original keeps a running maximum starting at 0 and updates it on a strict '>', so the first of tied best
    scores wins (np.argmax does the same) but when every score is <= 0 it silently keeps the box chosen for the
    previous expression (or crashes on the first). We instead still take the argmax and flag it with
    `fallback=True`. Raises ValueError when there are no proposals.
    """
    if len(proposals) == 0:
        raise ValueError('choose_box: no proposals for this image')
    scores = proposal_scores(heatmap, proposals, alpha)
    k = int(np.argmax(scores))
    return BoxChoice(k, [float(v) for v in proposals[k][:4]], float(scores[k]), not bool(scores[k] > 0))


def upsample_heatmap(pred, height: int, width: int, mask_size: int | None = None):
    """Resize a square Grad-CAM map (e.g. 24x24, given as a tensor/array/list, 2-D or flat) to [height, width]
    with bicubic interpolation (align_corners False), as grounding_eval does. Returns a float tensor on CPU."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(pred, dtype=torch.float32).detach().cpu()
    if t.dim() != 2:
        side = mask_size or int(round(t.numel() ** 0.5))
        t = t.reshape(side, side)
    out = F.interpolate(t[None, None], size=(int(height), int(width)), mode='bicubic', align_corners=False)
    return out[0, 0]


def grounding_eval(results, dets: Mapping, cocos, refer, alpha: float = 0.5, mask_size: int = 24,
                   verbose: bool = True) -> dict:
    """Box accuracy per split (the original's scoring): results = [{'ref_id', 'pred' (mask_size x mask_size)}].

    For each result the map is upsampled to the image size, the best detection of that image is chosen with
    `choose_box`, and it counts as correct when computeIoU with the ground-truth box is >= 0.5. Returns
    {'val_d', 'testA_d', 'testB_d'} as fractions (NaN for a split without items, where the original divides by
    zero). `cocos` is accepted for signature compatibility and unused, as in the original. Difference: when no
    detection scores > 0 the argmax is used instead of a stale box (see choose_box); the count is printed.
    """
    correct = {'val': 0, 'testA': 0, 'testB': 0}
    num = {'val': 0, 'testA': 0, 'testB': 0}
    fallbacks = 0
    for res in results:
        ref_id = int(res['ref_id'])
        ref = refer.Refs[ref_id]
        gt_box = refer.refToAnn[ref_id]['bbox']
        image = refer.Imgs[ref['image_id']]
        mask = upsample_heatmap(res['pred'], image['height'], image['width'], mask_size)
        key = str(ref['image_id'])
        if key not in dets or not dets[key]:
            raise DataError(f'detections: no proposals for image_id {key} (ref_id {ref_id})')
        choice = choose_box(mask, dets[key], alpha)
        fallbacks += choice.fallback
        split = ref['split']
        if split in num:
            num[split] += 1
            if computeIoU(gt_box, choice.box) >= 0.5:
                correct[split] += 1
    out = {}
    for split in ('val', 'testA', 'testB'):
        out[f'{split}_d'] = correct[split] / num[split] if num[split] else float('nan')
        if verbose:
            print(f'{split}: {out[split + "_d"]:.3f}')
    if fallbacks and verbose:
        print(f'note: for {fallbacks} expression(s) no detection scored > 0; the best-scoring one was used')
    return out
