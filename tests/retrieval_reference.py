"""The original's retrieval re-ranking, kept as the test oracle of evaluation/retrieval.py.

A straightforward per-query loop: for each image one fusion call (`model.itm_logits`) on its k candidate texts,
for each text one on its k candidate images. Every (image, text) pair in both top-k sets is scored twice, the
image's cross-attention keys/values are recomputed for every pair and every text runs at its padded length of 30:
slow, but obviously the original's algorithm. The evaluation's re-ranking must give the same matrices.

Distributed: the original's row split (`reference_rows`); each rank fills its rows and the matrices are summed
with zeros elsewhere.
"""
from __future__ import annotations

import numpy as np
import torch

import utils
from engine import autocast
from evaluation.common import progress_iter
from evaluation.retrieval import NO_SCORE, _rank_world, check_score_mode, clamp_k
from evaluation.retrieval_features import RetrievalFeatures, extract_features


def reference_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The original's row split of the per-query loop: blocks of n // world + 1 rows (the last ones may be empty)."""
    step = n // world + 1
    start = min(n, rank * step)
    return start, min(n, start + step)


def _merge_rows(matrix: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Sum each rank's own rows (zeros elsewhere) over all ranks; the identity at world size 1."""
    if not utils.is_dist_avail_and_initialized():
        return matrix
    part = torch.zeros_like(matrix)
    part[start:end] = matrix[start:end]
    return utils.all_reduce_sum(part)


@torch.no_grad()
def rerank_reference(model, feats: RetrievalFeatures, k_test: int, *, score: str = 'itm',
                     precision: str = 'fp32', rank: int | None = None, world: int | None = None,
                     reduce: bool = True, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query ITM re-ranking as the original: for each image its k texts, for each text its k images.

    With `reduce` False only this rank's row blocks (`reference_rows`) are filled (the rest stays -100): that is
    what a rank computes before the reduction. Returns (score_i2t [Ni, Nt], score_t2i [Nt, Ni]) on the device.
    """
    check_score_mode(score)
    rank, world = _rank_world(rank, world)
    sims = feats.similarity()
    n_img, n_txt = sims.shape
    if score == 'itc':
        return sims, sims.t().contiguous()
    device = sims.device
    k_i2t = clamp_k(k_test, n_txt, 'texts')
    k_t2i = clamp_k(k_test, n_img, 'images')
    add_itc = score == 'itm+itc'
    score_i2t = torch.full((n_img, n_txt), NO_SCORE, device=device)
    score_t2i = torch.full((n_txt, n_img), NO_SCORE, device=device)

    i0, i1 = reference_rows(n_img, rank, world)
    with autocast(device, precision):
        for i in progress_iter(range(i0, i1), i1 - i0, 'Re-rank image->text (reference)', progress):
            topk_sim, topk_idx = sims[i].topk(k_i2t)
            image = feats.image_embeds[i].to(device).unsqueeze(0).expand(k_i2t, -1, -1)
            logits = model.itm_logits(feats.text_embeds[topk_idx], feats.text_atts[topk_idx], image)[:, 1].float()
            score_i2t[i, topk_idx] = logits + topk_sim if add_itc else logits
    t0, t1 = reference_rows(n_txt, rank, world)
    sims_t = sims.t()
    with autocast(device, precision):
        for t in progress_iter(range(t0, t1), t1 - t0, 'Re-rank text->image (reference)', progress):
            topk_sim, topk_idx = sims_t[t].topk(k_t2i)
            images = feats.image_embeds[topk_idx.to(feats.image_embeds.device)].to(device)
            text = feats.text_embeds[t].unsqueeze(0).expand(k_t2i, -1, -1)
            atts = feats.text_atts[t].unsqueeze(0).expand(k_t2i, -1)
            logits = model.itm_logits(text, atts, images)[:, 1].float()
            score_t2i[t, topk_idx] = logits + topk_sim if add_itc else logits
    if reduce:
        score_i2t = _merge_rows(score_i2t, i0, i1)
        score_t2i = _merge_rows(score_t2i, t0, t1)
    return score_i2t, score_t2i


def evaluate_reference(model, data_loader, tokenizer, device: torch.device, *, k_test: int, score: str = 'itm',
                       precision: str = 'fp32', image_states: str = 'device',
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """What `evaluation.retrieval.score_matrices` returns, computed by the per-query loop."""
    check_score_mode(score)
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, data_loader, tokenizer, device, keep_states=score != 'itc',
                                 precision=precision, image_states=image_states, progress=progress)
        score_i2t, score_t2i = rerank_reference(model, feats, k_test, score=score, precision=precision,
                                                progress=progress)
    finally:
        model.train(was_training)
    return score_i2t.float().cpu().numpy(), score_t2i.float().cpu().numpy()
