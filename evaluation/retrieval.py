"""Image-text retrieval evaluation: ITC candidates, ITM re-ranking, R@K.

What is computed (the original's semantics):

1. Unimodal features once (evaluation/retrieval_features.py): every caption (padded / truncated to 30 tokens)
   through the text layers, every image through the ViT; the ITC similarity ``sims = image_feat @ text_feat.T``
   (no temperature).
2. Image -> text: for each image the ``k_test`` texts with the highest similarity are re-scored by the ITM head
   run on the fusion layers only (the cached text-layer states are not re-run); text -> image likewise with the
   ``k_test`` best images of each text. Everything outside the top-k holds -100.
3. ``itm_eval`` (evaluation/retrieval_metrics.py): R@1/5/10 in both directions and their means (txt_* =
   image->text, img_* = text->image).

Score modes (``score``): ``'itm'`` = the raw ITM "match" logit (what the ALBEF checkpoints were tuned for; use it
to reproduce their numbers), ``'itm+itc'`` = logit + ITC similarity on the top-k (the BLIP recipe), ``'itc'`` =
the similarity matrix alone, no re-ranking (zero-shot dual-encoder retrieval, e.g. of a pretraining checkpoint).

The re-ranking gives the numbers of the original's per-query loop (one fusion call per query on its k
candidates; tests/retrieval_reference.py keeps that loop as the test oracle) with less work: the ITM score of a
pair does not depend on the direction, so each unique pair of the union of both top-k sets is scored once, by
the model's batched pair scorer (models/itm_scoring.py), ``itm_batch_size`` pairs at a time, grouped by image.
Optional bf16 autocast (``precision``) and image states kept on the CPU (``image_states='cpu'``).

Distributed: every rank encodes the whole set (as the original; the re-ranking dominates), then each rank scores
a contiguous slice of the (image-sorted) unique pairs (``rank_slice``). Partial results are summed with zeros
elsewhere, so the reduced matrices equal the single-process ones (the original summed -100-filled matrices,
shifting every score by -100 (W - 1); rankings were unaffected).

Reproducing the paper with the released checkpoints (notes; the full-size runs need the real datasets):

* Fine-tuned retrieval (paper Table 2): ``flickr30k.pth`` with configs/Retrieval_flickr.yaml and ``mscoco.pth``
  with configs/Retrieval_coco.yaml, ``--evaluate --score itm``, image_res 384 (as the configs), k_test 128 / 256.
  The released fine-tuned files are flat and lack the momentum weights; our checkpoint loader accepts them.
* Zero-shot Flickr30K (paper Table 3): the paper evaluates the **COCO-fine-tuned** model (mscoco.pth, 384 px) on
  Flickr30K with ITM re-ranking, i.e. ``--config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate``
  (maintainer, salesforce/ALBEF issues #29 and #89). The pretrained ALBEF.pth (trained at 256 px) evaluated the same
  way reports lower numbers (TR@1 88.5, IR@1 75.9 on the Flickr test set, issue #3/#29) - that is not the paper's
  zero-shot setting.
* ``--score itc`` with a pretraining checkpoint (ALBEF.pth / ALBEF_4M.pth; use image_res 256, the pretraining
  resolution) gives dual-encoder zero-shot retrieval; the paper reports no number for it.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np
import torch

import utils
from evaluation.common import ResultsFile, progress_iter
from evaluation.retrieval_features import (IMAGE_STATE_PLACES, RetrievalFeatures,  # noqa: F401 (Retrieval.py)
                                           extract_features)
from evaluation.retrieval_metrics import itm_eval
from models.itm_scoring import ITMPairScorer

SCORE_MODES = ('itm', 'itm+itc', 'itc')
NO_SCORE = -100.0       # the original's fill value outside the top-k


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = utils.get_rank() if rank is None else int(rank)
    world = utils.get_world_size() if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f'rank {rank} outside a world of size {world}')
    return rank, world


def _broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` in place with rank 0's copy (no-op without a process group)."""
    if utils.is_dist_avail_and_initialized():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s share of n work items split into `world` contiguous, near-equal parts."""
    return n * rank // world, n * (rank + 1) // world


def clamp_k(k_test: int, n_candidates: int, what: str) -> int:
    """k_test limited to the number of candidates, with a warning when it had to be reduced."""
    if k_test > n_candidates:
        warnings.warn(f'k_test {k_test} is larger than the number of candidate {what} ({n_candidates}); '
                      f'using k = {n_candidates}', stacklevel=3)
        return n_candidates
    return k_test


def check_score_mode(score: str) -> str:
    """`score` when it is one of SCORE_MODES; a ConfigError otherwise."""
    if score not in SCORE_MODES:
        raise utils.ConfigError(f"score must be one of {', '.join(SCORE_MODES)}, got {score!r}")
    return score


def top_candidates(sims: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k text indices per image [Ni, k] and top-k image indices per text [Nt, k'] (k clamped with a warning)."""
    n_img, n_txt = sims.shape
    k_i2t = clamp_k(k_test, n_txt, 'texts')
    k_t2i = clamp_k(k_test, n_img, 'images')
    return sims.topk(k_i2t, dim=1).indices, sims.t().topk(k_t2i, dim=1).indices


# ----------------------------------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------------------------------
def candidate_pairs(topk_i2t: torch.Tensor, topk_t2i: torch.Tensor, n_txt: int) -> torch.Tensor:
    """The unique (image, text) pairs of both top-k sets as sorted linear ids image * n_txt + text.

    Sorting by linear id groups the pairs by image, which the fast scorer relies on.
    """
    n_img = topk_i2t.size(0)
    rows_i = torch.arange(n_img, device=topk_i2t.device).unsqueeze(1)
    rows_t = torch.arange(topk_t2i.size(0), device=topk_t2i.device).unsqueeze(1)
    lin_i2t = (rows_i * n_txt + topk_i2t).reshape(-1)
    lin_t2i = (topk_t2i * n_txt + rows_t).reshape(-1)
    return torch.unique(torch.cat([lin_i2t, lin_t2i]))  # sorted


@torch.no_grad()
def score_pairs(scorer: ITMPairScorer, pairs: torch.Tensor, n_txt: int, *, batch_size: int, rank: int = 0,
                world: int = 1, progress: bool = True) -> tuple[int, int, torch.Tensor]:
    """Score this rank's contiguous slice of the sorted linear pair ids; returns (start, end, logits[end-start])."""
    start, end = rank_slice(pairs.numel(), rank, world)
    mine = pairs[start:end]
    n_batches = math.ceil(mine.numel() / batch_size)
    out = torch.empty(mine.numel(), dtype=torch.float32, device=pairs.device)
    for b in progress_iter(range(n_batches), n_batches, f'Re-rank {mine.numel()} pairs', progress):
        lin = mine[b * batch_size:(b + 1) * batch_size]
        out[b * batch_size:b * batch_size + lin.numel()] = scorer.score(lin // n_txt, lin % n_txt).to(out.device)
    return start, end, out


def fill_score_matrices(pairs: torch.Tensor, pair_scores: torch.Tensor, topk_i2t: torch.Tensor,
                        topk_t2i: torch.Tensor, sims: torch.Tensor, add_itc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter the unique pairs' logits into the two -100-filled matrices at each query's top-k positions."""
    n_img, n_txt = sims.shape
    rows_i = torch.arange(n_img, device=sims.device).unsqueeze(1)
    rows_t = torch.arange(n_txt, device=sims.device).unsqueeze(1)
    score_i2t = torch.full((n_img, n_txt), NO_SCORE, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), NO_SCORE, device=sims.device)
    vals = pair_scores[torch.searchsorted(pairs, rows_i * n_txt + topk_i2t)]
    if add_itc:
        vals = vals + sims.gather(1, topk_i2t)
    score_i2t.scatter_(1, topk_i2t, vals)
    vals = pair_scores[torch.searchsorted(pairs, topk_t2i * n_txt + rows_t)]
    if add_itc:
        vals = vals + sims.t().gather(1, topk_t2i)
    score_t2i.scatter_(1, topk_t2i, vals)
    return score_i2t, score_t2i


@torch.no_grad()
def rerank_fast(model, feats: RetrievalFeatures, k_test: int, *, score: str = 'itm', precision: str = 'fp32',
                itm_batch_size: int = 1024, rank: int | None = None, world: int | None = None, reduce: bool = True,
                progress: bool = True, release_text_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices (score_i2t [Ni, Nt], score_t2i [Nt, Ni], on the device) of `feats` (see the module
    docstring); the same numbers as the original's per-query loop.

    With `reduce` False and world > 1 only this rank's slice of the pairs is scored (the other pairs count as
    logit 0 before the sum over ranks), for testing the split without a process group. With
    `release_text_states` the [Nt, 30, H] text states are dropped from `feats` once the scorer has packed them.
    """
    check_score_mode(score)
    rank, world = _rank_world(rank, world)
    sims = feats.similarity()
    n_img, n_txt = sims.shape
    if score == 'itc':
        return sims, sims.t().contiguous()
    if itm_batch_size < 1:
        raise utils.ConfigError(f'itm_batch_size must be >= 1, got {itm_batch_size}')
    topk_i2t, topk_t2i = top_candidates(sims, k_test)
    # Every rank must index the same pair list (the scores are summed position by position); the ranks encode
    # the set independently, so take rank 0's candidates rather than trust bitwise-identical features.
    _broadcast_from_main(topk_i2t)
    _broadcast_from_main(topk_t2i)
    pairs = candidate_pairs(topk_i2t, topk_t2i, n_txt)
    with utils.autocast(sims.device, precision):
        scorer = ITMPairScorer(model, feats.image_embeds, feats.text_embeds, feats.text_atts, sims.device,
                               torch.bfloat16 if precision == 'bf16' else None)
        if release_text_states:
            feats.text_embeds = None
        start, end, local = score_pairs(scorer, pairs, n_txt, batch_size=itm_batch_size, rank=rank, world=world,
                                        progress=progress)
    pair_scores = torch.zeros(pairs.numel(), dtype=torch.float32, device=sims.device)
    pair_scores[start:end] = local
    if reduce:
        utils.all_reduce_sum(pair_scores)  # each pair is scored by exactly one rank: the sum is exact
    return fill_score_matrices(pairs, pair_scores, topk_i2t, topk_t2i, sims, score == 'itm+itc')


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def score_matrices(model, data_loader, tokenizer, device: torch.device, *, k_test: int, score: str = 'itm',
                   precision: str = 'fp32', itm_batch_size: int = 1024, image_states: str = 'auto',
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices (i2t [Ni, Nt], t2i [Nt, Ni], numpy float32) of the retrieval set behind `data_loader`.

    `model` is the unwrapped retrieval model (put in eval mode for the pass, its mode restored afterwards);
    `data_loader` yields (images, indices) of a re_eval_dataset (every rank iterates the whole set). Every rank
    returns the reduced matrices; `itm_eval` turns them into R@K.
    """
    check_score_mode(score)
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, data_loader, tokenizer, device, keep_states=score != 'itc',
                                 precision=precision, image_states=image_states, progress=progress)
        score_i2t, score_t2i = rerank_fast(model, feats, k_test, score=score, precision=precision,
                                           itm_batch_size=itm_batch_size, progress=progress,
                                           release_text_states=True)
    finally:
        model.train(was_training)
    return score_i2t.float().cpu().numpy(), score_t2i.float().cpu().numpy()


class RetrievalEvaluator:
    """evaluate_fn for engine.fit: R@K of named splits, logged under the original's names (val_txt_r1 ...).

    Every evaluation is kept in the readable JSON `results_path` (with the settings used); `finish` adds the best
    epoch (the one whose checkpoint_best.pth engine.fit kept) and its metrics at the top level.
    """

    def __init__(self, model, loaders: Mapping, tokenizer, device: torch.device, *, k_test: int,
                 score: str = 'itm', precision: str = 'fp32', itm_batch_size: int = 1024,
                 image_states: str = 'auto', results_path: str | None = None, resume: bool = False,
                 extra: Mapping | None = None):
        self.model, self.loaders, self.tokenizer, self.device = model, dict(loaders), tokenizer, device
        self.options = dict(k_test=k_test, score=check_score_mode(score), precision=precision,
                            itm_batch_size=itm_batch_size, image_states=image_states)
        self.results_path = results_path
        self.file = ResultsFile(results_path, {'settings': {**self.options, **dict(extra or {})}}, resume=resume,
                                best_at_top_level=True)
        self.results = self.file.data

    def run(self, label: str) -> dict[str, dict]:
        """Metrics of every split (stored under `label` in the results file); returns {split: metrics}."""
        metrics = {}
        for split, loader in self.loaders.items():
            print(f'Evaluate {split} [{label}]: {len(loader.dataset)} images, {len(loader.dataset.text)} texts, '
                  f"k_test {self.options['k_test']}, score {self.options['score']}", flush=True)
            scores = score_matrices(self.model, loader, self.tokenizer, self.device, **self.options)
            metrics[split] = itm_eval(*scores, loader.dataset.txt2img, loader.dataset.img2txt)
            m = metrics[split]
            print(f"{split}: TR@1 {m['txt_r1']:.2f} TR@5 {m['txt_r5']:.2f} TR@10 {m['txt_r10']:.2f} | "
                  f"IR@1 {m['img_r1']:.2f} IR@5 {m['img_r5']:.2f} IR@10 {m['img_r10']:.2f} | "
                  f"r_mean {m['r_mean']:.2f}", flush=True)
        self.file.add(label, metrics)
        return metrics

    @staticmethod
    def record(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The log.txt fields: '<split>_<metric>' (val_txt_r1 ... test_r_mean), as numbers."""
        return {f'{split}_{k}': v for split, m in metrics.items() for k, v in m.items()}

    def __call__(self, epoch: int) -> dict[str, float]:
        return self.record(self.run(str(epoch)))

    def finish(self, best_label) -> None:
        """Put the best evaluation's metrics at the top level of the results file."""
        self.file.finish(best_label)
