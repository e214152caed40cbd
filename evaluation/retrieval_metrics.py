"""R@K of image-text retrieval from two score matrices, as the original's `itm_eval`."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _gt_ranks(scores: np.ndarray, gt: Sequence[Sequence[int]], chunk: int = 1024) -> np.ndarray:
    """Per row: the smallest position of any ground-truth column in the row's descending argsort.

    Uses numpy's argsort reversed, exactly as the original, so ties (e.g. the -100 fill) are broken the same way.
    """
    n, m = scores.shape
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.argsort(scores[start:start + chunk], axis=1)[:, ::-1]
        position = np.empty_like(block)
        rows = np.arange(block.shape[0])[:, None]
        position[rows, block] = np.arange(m)[None, :]
        for r in range(block.shape[0]):
            ranks[start + r] = position[r, list(gt[start + r])].min()
    return ranks


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Mapping[int, int],
             img2txt: Mapping[int, Sequence[int]]) -> dict[str, float]:
    """R@1/5/10 image->text (txt_*) and text->image (img_*), their means and r_mean, in percent."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f'itm_eval: scores_t2i has shape {scores_t2i.shape}, expected {(n_txt, n_img)}')
    gt_txt = [img2txt[i] for i in range(n_img)]
    if any(len(g) == 0 for g in gt_txt):
        raise ValueError(f'itm_eval: image {next(i for i, g in enumerate(gt_txt) if not g)} has no caption')
    ranks_i2t = _gt_ranks(scores_i2t, gt_txt)
    ranks_t2i = _gt_ranks(scores_t2i, [[txt2img[t]] for t in range(n_txt)])

    def recall(ranks, k):
        return 100.0 * float(np.mean(ranks < k))

    out = {'txt_r1': recall(ranks_i2t, 1), 'txt_r5': recall(ranks_i2t, 5), 'txt_r10': recall(ranks_i2t, 10)}
    out['txt_r_mean'] = (out['txt_r1'] + out['txt_r5'] + out['txt_r10']) / 3
    out.update(img_r1=recall(ranks_t2i, 1), img_r5=recall(ranks_t2i, 5), img_r10=recall(ranks_t2i, 10))
    out['img_r_mean'] = (out['img_r1'] + out['img_r5'] + out['img_r10']) / 3
    out['r_mean'] = (out['txt_r_mean'] + out['img_r_mean']) / 2
    return out
