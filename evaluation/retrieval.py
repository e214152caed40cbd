"""Image-text retrieval evaluation (spec 10.3): ITC candidates, ITM re-ranking, R@K.

What is computed (the original's semantics):

1. Unimodal features once: every caption (tokenized in chunks of 256, padded / truncated to 30 tokens) through the
   text layers, every image through the ViT; the ITC similarity ``sims = image_feat @ text_feat.T`` (no temperature).
2. Image -> text: for each image the ``k_test`` texts with the highest similarity are re-scored by the ITM head
   run on the fusion layers only (the cached text-layer states are not re-run); text -> image likewise with the
   ``k_test`` best images of each text. Everything outside the top-k holds -100.
3. ``itm_eval``: R@1/5/10 in both directions and their means (txt_* = image->text, img_* = text->image).

Score modes (``score``): ``'itm'`` = the raw ITM "match" logit (what the ALBEF checkpoints were tuned for; use it
to reproduce their numbers), ``'itm+itc'`` = logit + ITC similarity on the top-k (the BLIP recipe), ``'itc'`` =
the similarity matrix alone, no re-ranking (zero-shot dual-encoder retrieval, e.g. of a pretraining checkpoint).

Two implementations with identical results:

* ``evaluate_reference`` - the straightforward per-query loop of the original: one fusion call per query on its
  k candidates, so every (image, text) pair that is in both top-k sets is scored twice, the image's cross-attention
  keys/values are recomputed for every pair and every text is run at its padded length of 30.
* ``evaluate_fast`` - the same numbers (fp32: score matrices equal within float rounding, ~1e-6), reorganised:
  the ITM score of a pair does not depend on the direction, so each unique pair of the union of both top-k sets
  is scored once; pairs are batched ``itm_batch_size`` at a time, grouped by image; per image and fusion layer
  the cross-attention keys/values are computed once (not once per pair); the first fusion layer's
  self-attention, which sees only the text, is computed once per text; padding tokens are dropped (they are
  masked out of every attention, so they cannot change the [CLS] state) by packing the real tokens of all pairs;
  and the last fusion layer is evaluated for the [CLS] position only (the ITM head reads nothing else).
  Optional bf16 autocast (``precision``) and image states kept on the CPU (``image_states='cpu'``) for sets whose
  ViT states do not fit the accelerator (COCO-5k at 384 px holds 5000 x 577 x 768 floats = 8.9 GB in fp32).

Distributed: every rank encodes the whole set (as the original; the re-ranking dominates), then the re-ranking is
split: the fast path gives each rank a contiguous slice of the (image-sorted) unique pairs (``rank_slice``), the
reference the original's row blocks (``reference_rows``). Partial results are summed with zeros elsewhere, so the
reduced matrices equal the single-process ones (the original summed -100-filled matrices, shifting every score by
-100 (W - 1), spec 15.6; rankings were unaffected).

Reproducing the paper with the released checkpoints (notes; the full-size runs need the real datasets):

* Fine-tuned retrieval (paper Table 2): ``flickr30k.pth`` with configs/Retrieval_flickr.yaml and ``mscoco.pth``
  with configs/Retrieval_coco.yaml, ``--evaluate --score itm``, image_res 384 (as the configs), k_test 128 / 256.
  The released fine-tuned files are flat and lack the momentum weights (spec 15.11); our checkpoint loader
  accepts them.
* Zero-shot Flickr30K (paper Table 3): the paper evaluates the **COCO-fine-tuned** model (mscoco.pth, 384 px) on
  Flickr30K with ITM re-ranking, i.e. ``--config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate``
  (maintainer, salesforce/ALBEF issues #29 and #89). The pretrained ALBEF.pth (trained at 256 px) evaluated the same
  way reports lower numbers (TR@1 88.5, IR@1 75.9 on the Flickr test set, issue #3/#29) - that is not the paper's
  zero-shot setting.
* ``--score itc`` with a pretraining checkpoint (ALBEF.pth / ALBEF_4M.pth; use image_res 256, the pretraining
  resolution) gives dual-encoder zero-shot retrieval; the paper reports no number for it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import utils
from models.xbert import SELF_MASK_VALUE, self_attention_mask

SCORE_MODES = ('itm', 'itm+itc', 'itc')
IMAGE_STATE_PLACES = ('auto', 'device', 'cpu')
TEXT_CHUNK = 256        # captions per text-encoder call (the original's chunk)
TEXT_MAX_LENGTH = 30    # evaluation tokenization: padding/truncation to 30 tokens (spec 3)
NO_SCORE = -100.0       # the original's fill value outside the top-k


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, precision: str):
    """The engine's autocast context (fp32: none)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    import engine  # imported lazily: engine pulls in the optimizer package
    return engine.autocast(device, precision)


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


def reference_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The original's row split of the per-query loop: blocks of n // world + 1 rows (the last ones may be empty)."""
    step = n // world + 1
    start = min(n, rank * step)
    return start, min(n, start + step)


def clamp_k(k_test: int, n_candidates: int, what: str) -> int:
    """k_test limited to the number of candidates, with a warning when it had to be reduced."""
    if k_test > n_candidates:
        warnings.warn(f'k_test {k_test} is larger than the number of candidate {what} ({n_candidates}); '
                      f'using k = {n_candidates}', stacklevel=3)
        return n_candidates
    return k_test


def check_score_mode(score: str) -> str:
    if score not in SCORE_MODES:
        raise utils.ConfigError(f"score must be one of {', '.join(SCORE_MODES)}, got {score!r}")
    return score


def _iterate(iterable, n: int, header: str, progress: bool, print_freq: int | None = None):
    """`iterable` with the MetricLogger progress display (about ten lines) or silently."""
    if not progress:
        return iterable
    freq = print_freq or max(1, math.ceil(n / 10))
    return utils.MetricLogger().log_every(iterable, freq, header, total=n)


# ----------------------------------------------------------------------------------------------------------------
# Unimodal features (shared by both implementations, so that both see identical candidates)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalFeatures:
    """Everything the re-ranking needs, computed once per evaluation.

    image_embeds [Ni, 1+P, Wv] ViT states (on the device or, offloaded, on the CPU; None in 'itc' mode),
    image_feat [Ni, D] and text_feat [Nt, D] L2-normalised ITC features, text_embeds [Nt, 30, H] text-layer
    states and text_atts [Nt, 30] (None in 'itc' mode).
    """
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_atts: torch.Tensor | None = None

    def similarity(self) -> torch.Tensor:
        """ITC similarity [Ni, Nt] (cosine, no temperature), float32."""
        return self.image_feat.float() @ self.text_feat.float().t()


def _image_state_place(place: str, device: torch.device, shape: tuple, dtype: torch.dtype) -> torch.device:
    """Where to keep the ViT states: the device, or the CPU when asked or (auto) when they would take more than
    half of the accelerator's free memory."""
    if place not in IMAGE_STATE_PLACES:
        raise utils.ConfigError(f"image_states must be one of {', '.join(IMAGE_STATE_PLACES)}, got {place!r}")
    if device.type == 'cpu' or place == 'device':
        return device
    if place == 'cpu':
        return torch.device('cpu')
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else need * 4
    if need > free // 2:
        print(f'note: image states need {need / 2 ** 30:.1f} GiB, more than half of the free device memory '
              f'({free / 2 ** 30:.1f} GiB); keeping them on the CPU')
        return torch.device('cpu')
    return device


@torch.no_grad()
def extract_features(model, data_loader, tokenizer, device: torch.device, *, keep_states: bool = True,
                     precision: str = 'fp32', image_states: str = 'auto', progress: bool = True,
                     text_chunk: int = TEXT_CHUNK, max_length: int = TEXT_MAX_LENGTH) -> RetrievalFeatures:
    """Encode all captions of `data_loader.dataset.text` and all images of the loader (spec 10.3 steps 1-2).

    Captions are tokenized as the original (padding / truncation to `max_length` = 30) but encoded in chunks of
    similar length cut to their longest caption (same states, less work). Images are placed by the index the
    loader yields, so the row order is the dataset order whatever the loader order. With bf16 the ViT states are stored in bf16: the fusion layers' key/value projections (their only
    reader) cast them to bf16 under autocast anyway, so nothing changes but the memory.
    """
    dataset = data_loader.dataset
    texts = list(dataset.text)
    n_img = len(dataset)
    if not texts:
        raise ValueError('retrieval evaluation: the dataset has no captions')
    tok = tokenizer(texts, padding='max_length', truncation=True, max_length=max_length, return_tensors='pt')
    all_ids, all_atts = tok.input_ids.to(device), tok.attention_mask.to(device)
    # Encode in chunks of captions of similar length, each cut to its longest caption: the padding columns are
    # masked out of every attention (weight exactly 0), so the real tokens' states are those of the padded run.
    order = torch.argsort(all_atts.sum(1), stable=True)
    feats = RetrievalFeatures(image_feat=None, text_feat=None)
    text_feat = None
    with _autocast(device, precision):
        for start in range(0, len(texts), text_chunk):
            rows = order[start:start + text_chunk]
            atts = all_atts[rows]
            width = int(atts.sum(1).max())
            embeds, feat = model.encode_text(all_ids[rows, :width], atts[:, :width])
            if text_feat is None:
                text_feat = torch.empty(len(texts), feat.size(1), device=device)
                if keep_states:  # stored at the full width (zeros past each caption), as the original keeps them
                    feats.text_embeds = torch.zeros(len(texts), max_length, embeds.size(-1), dtype=embeds.dtype,
                                                    device=device)
            text_feat[rows] = feat.float()
            if keep_states:
                feats.text_embeds[rows, :width] = embeds
    feats.text_feat = text_feat
    if keep_states:
        feats.text_atts = all_atts

    image_feat = None
    seen = torch.zeros(n_img, dtype=torch.bool)
    with _autocast(device, precision):
        for image, index in _iterate(data_loader, len(data_loader), 'Evaluation: encode images', progress):
            embeds, feat = model.encode_image(image.to(device, non_blocking=True))
            index = torch.as_tensor(index).long()
            if image_feat is None:
                image_feat = torch.zeros(n_img, feat.size(1), device=device)
                if keep_states:
                    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
                    shape = (n_img,) + tuple(embeds.shape[1:])
                    place = _image_state_place(image_states, device, shape, dtype)
                    feats.image_embeds = torch.empty(shape, dtype=dtype, device=place,
                                                     pin_memory=place.type == 'cpu' and device.type == 'cuda')
            image_feat[index.to(device)] = feat.float()
            if keep_states:
                feats.image_embeds[index.to(feats.image_embeds.device)] = embeds.to(
                    feats.image_embeds.device, feats.image_embeds.dtype, non_blocking=True)
            seen[index] = True
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0])
        raise RuntimeError(f'retrieval evaluation: the loader never yielded image {missing} of {n_img} '
                           f'(a sampler that shards or drops items cannot be used here)')
    feats.image_feat = image_feat
    return feats


def top_candidates(sims: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k text indices per image [Ni, k] and top-k image indices per text [Nt, k'] (k clamped with a warning)."""
    n_img, n_txt = sims.shape
    k_i2t = clamp_k(k_test, n_txt, 'texts')
    k_t2i = clamp_k(k_test, n_img, 'images')
    return sims.topk(k_i2t, dim=1).indices, sims.t().topk(k_t2i, dim=1).indices


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
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
    """R@1/5/10 image->text (txt_*) and text->image (img_*), their means and r_mean, in percent (spec 10.3)."""
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


# ----------------------------------------------------------------------------------------------------------------
# Reference implementation: the straightforward per-query loop
# ----------------------------------------------------------------------------------------------------------------
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
    with _autocast(device, precision):
        for i in _iterate(range(i0, i1), i1 - i0, 'Re-rank image->text (reference)', progress):
            topk_sim, topk_idx = sims[i].topk(k_i2t)
            image = feats.image_embeds[i].to(device).unsqueeze(0).expand(k_i2t, -1, -1)
            logits = model.itm_logits(feats.text_embeds[topk_idx], feats.text_atts[topk_idx], image)[:, 1].float()
            score_i2t[i, topk_idx] = logits + topk_sim if add_itc else logits
    t0, t1 = reference_rows(n_txt, rank, world)
    sims_t = sims.t()
    with _autocast(device, precision):
        for t in _iterate(range(t0, t1), t1 - t0, 'Re-rank text->image (reference)', progress):
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


# ----------------------------------------------------------------------------------------------------------------
# Fast implementation
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


class FusionScorer:
    """ITM match logits of arbitrary (image, text) pairs, computed with the fusion layers of a retrieval model.

    Numerically the same function as `model.itm_logits(text_embeds[t], text_atts[t], image_embeds[i])[:, 1]`,
    evaluated with less work (see the module docstring):

    * per text, once: the first fusion layer's self-attention block and its cross-attention queries (both see
      only the text), real tokens packed ([sum of lengths, H]);
    * per image of a batch, once: the cross-attention keys and values of every fusion layer;
    * per pair: the rest, on the packed real tokens of all pairs of the batch (grouped by image, so the tokens that
      attend to one image are contiguous); the last layer only for the [CLS] rows.

    It reads the layer modules of `model.text_encoder` (xbert: attention.self.{query,key,value}, attention.output,
    crossattention.*, intermediate, output) and `model.itm_head`; the model must be in eval mode (no dropout).
    """

    def __init__(self, model, feats: RetrievalFeatures, device: torch.device, precision: str = 'fp32',
                 text_chunk: int = TEXT_CHUNK):
        encoder = model.text_encoder
        cfg = encoder.config
        self.layers = list(encoder.encoder.layer)[cfg.fusion_layer:]
        if not self.layers:
            raise utils.ConfigError(f'bert_config: fusion_layer {cfg.fusion_layer} leaves no fusion layer for ITM '
                                    f'(num_hidden_layers {cfg.num_hidden_layers})')
        self.itm_head = model.itm_head
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.device, self.precision = device, precision
        self.image_embeds = feats.image_embeds
        # Fused projections (one GEMM instead of two or three), cast once for bf16.
        dtype = torch.bfloat16 if precision == 'bf16' else None
        self.cross_kv = [self._fuse(layer.crossattention.self.key, layer.crossattention.self.value, dtype=dtype)
                         for layer in self.layers]
        self.self_qkv = [self._fuse(layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                                    dtype=dtype) for layer in self.layers]
        self.self_kv = [self._fuse(layer.attention.self.key, layer.attention.self.value, dtype=dtype)
                        for layer in self.layers]
        self._build_text_cache(feats.text_embeds, feats.text_atts, text_chunk)

    @staticmethod
    def _fuse(*linears, dtype=None):
        weight = torch.cat([m.weight for m in linears]).detach()
        bias = torch.cat([m.bias for m in linears]).detach()
        return (weight, bias) if dtype is None else (weight.to(dtype), bias.to(dtype))

    # -- text side ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _build_text_cache(self, text_embeds: torch.Tensor, text_atts: torch.Tensor, chunk: int) -> None:
        """Per text: the first fusion layer's self-attention output and its cross-attention queries.

        Sets text_cache [sum of lengths, H] and text_query [sum of lengths, H] (real tokens only, packed text after
        text), text_start [Nt] and text_len [Nt].
        """
        n_txt, max_len = text_atts.shape
        lengths = text_atts.sum(1)
        right_padded = torch.arange(max_len, device=text_atts.device)[None, :] < lengths[:, None]
        if not torch.equal(right_padded, text_atts.bool()) or int(lengths.min()) < 1:
            raise ValueError('retrieval evaluation: text attention masks must be right-padded runs of ones')
        layer = self.layers[0]
        states, queries = [], []
        with _autocast(self.device, self.precision):
            for start in range(0, n_txt, chunk):
                atts = text_atts[start:start + chunk]
                width = int(lengths[start:start + chunk].max())  # columns past it are padding in every row
                atts = atts[:, :width]
                x = text_embeds[start:start + chunk, :width].to(self.device)
                out = layer.attention(x, self_attention_mask(atts, x.dtype))[atts.bool()]
                states.append(out)
                queries.append(layer.crossattention.self.query(out))
        self.text_cache = torch.cat(states)
        self.text_query = torch.cat(queries)
        self.text_len = lengths.to(self.device)
        self.text_start = torch.cumsum(self.text_len, 0) - self.text_len

    # -- pieces of a fusion layer ------------------------------------------------------------------------------
    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., heads, d] (a view)."""
        return x.view(*x.shape[:-1], self.heads, self.head_dim)

    def _image_keys_values(self, image_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per fusion layer: cross-attention keys and values of the images, each [n, heads, 1+P, d]."""
        kv = []
        for weight, bias in self.cross_kv:
            k, v = F.linear(image_states, weight, bias).split(self.hidden, dim=-1)
            # Contiguous [n, heads, 1+P, d]: every query group of the image reads them, strided reads are slow.
            kv.append((self._split_heads(k).transpose(1, 2).contiguous(),
                       self._split_heads(v).transpose(1, 2).contiguous()))
        return kv

    def _self_attention(self, j, h, pair_of_tok, pos, lengths, cls_rows, cls_only):
        """Self-attention block of fusion layer j on packed tokens h [T, H]; with cls_only only the [CLS] rows
        [Np, H] come out (their queries are the only ones computed)."""
        layer = self.layers[j]
        n_pairs, width = lengths.numel(), int(lengths.max())
        if cls_only:
            k, v = F.linear(h, *self.self_kv[j]).split(self.hidden, dim=-1)
            q_rows = h[cls_rows]
            q = layer.attention.self.query(q_rows)
            queries = self._split_heads(q).unsqueeze(2)                     # [Np, heads, 1, d]
        else:
            q, k, v = F.linear(h, *self.self_qkv[j]).split(self.hidden, dim=-1)
            q_rows = h
        # Padded [Np, width, H] layout for the attention core only; padding keys get the model's additive -10000,
        # whose weight underflows to exactly 0, so they cannot change a real token's output.
        padded = h.new_zeros((2 if cls_only else 3), n_pairs, width, self.hidden, dtype=k.dtype)
        padded[0, pair_of_tok, pos] = k
        padded[1, pair_of_tok, pos] = v
        keys = self._split_heads(padded[0]).transpose(1, 2)
        values = self._split_heads(padded[1]).transpose(1, 2)
        if not cls_only:
            padded[2, pair_of_tok, pos] = q
            queries = self._split_heads(padded[2]).transpose(1, 2)
        pad = torch.arange(width, device=h.device)[None, :] >= lengths[:, None]
        mask = (pad.to(keys.dtype) * SELF_MASK_VALUE)[:, None, None, :]
        ctx = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask).transpose(1, 2)
        ctx = ctx.reshape(n_pairs, self.hidden) if cls_only else ctx[pair_of_tok, pos].reshape(-1, self.hidden)
        return layer.attention.output(ctx, q_rows)

    def _cross_attention(self, j, h, q, keys, values, rows_per_image):
        """Cross-attention block of fusion layer j: h [R, H] and its queries q [R, H], rows contiguous per image
        (rows_per_image[g] rows attend to image g of keys/values [n, heads, 1+P, d])."""
        layer = self.layers[j]
        q = self._split_heads(q)                                            # [R, heads, d]
        ctx = torch.empty_like(q)
        start = 0
        for g, n in enumerate(rows_per_image):
            out = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1).unsqueeze(0),
                                                 keys[g:g + 1], values[g:g + 1])
            ctx[start:start + n] = out[0].transpose(0, 1)
            start += n
        return layer.crossattention.output(ctx.view(-1, self.hidden), h)

    # -- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """Match logits (float32) of pairs (image_idx[p], text_idx[p]); the pairs must be grouped by image."""
        device = self.device
        image_idx, text_idx = image_idx.to(device), text_idx.to(device)
        images, pairs_per_image = torch.unique_consecutive(image_idx, return_counts=True)
        if images.numel() != torch.unique(images).numel():
            raise ValueError('FusionScorer.score: pairs must be grouped by image')
        lengths = self.text_len[text_idx]
        n_pairs = lengths.numel()
        pair_start = torch.cumsum(lengths, 0) - lengths              # [CLS] row of each pair in the packed batch
        pair_of_tok = torch.repeat_interleave(torch.arange(n_pairs, device=device), lengths)
        pos = torch.arange(pair_of_tok.numel(), device=device) - pair_start[pair_of_tok]
        tok_per_image = torch.zeros(images.numel(), dtype=lengths.dtype, device=device).index_add_(
            0, torch.repeat_interleave(torch.arange(images.numel(), device=device), pairs_per_image), lengths)
        pairs_per_image, tok_per_image = pairs_per_image.tolist(), tok_per_image.tolist()
        rows = self.text_start[text_idx][pair_of_tok] + pos           # packed-cache row of every token

        with _autocast(device, self.precision):
            states = self.image_embeds[images.to(self.image_embeds.device)].to(device, non_blocking=True)
            kv = self._image_keys_values(states)
            last = len(self.layers) - 1
            h, q = self.text_cache[rows], self.text_query[rows]
            if last == 0:  # a single fusion layer: only the [CLS] rows matter
                h, q = h[pair_start], q[pair_start]
            for j, layer in enumerate(self.layers):
                if j > 0:
                    h = self._self_attention(j, h, pair_of_tok, pos, lengths, pair_start, cls_only=j == last)
                    q = layer.crossattention.self.query(h)
                h = self._cross_attention(j, h, q, kv[j][0], kv[j][1],
                                          pairs_per_image if j == last else tok_per_image)
                h = layer.output(layer.intermediate(h), h)
            return self.itm_head(h)[:, 1].float()


@torch.no_grad()
def score_pairs(scorer: FusionScorer, pairs: torch.Tensor, n_txt: int, *, batch_size: int, rank: int = 0,
                world: int = 1, progress: bool = True) -> tuple[int, int, torch.Tensor]:
    """Score this rank's contiguous slice of the sorted linear pair ids; returns (start, end, logits[end-start])."""
    start, end = rank_slice(pairs.numel(), rank, world)
    mine = pairs[start:end]
    n_batches = math.ceil(mine.numel() / batch_size)
    out = torch.empty(mine.numel(), dtype=torch.float32, device=pairs.device)
    for b in _iterate(range(n_batches), n_batches, f'Re-rank {mine.numel()} pairs', progress):
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
    """The fast re-ranking; same outputs as `rerank_reference` (see the module docstring).

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
    scorer = FusionScorer(model, feats, sims.device, precision)
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
# Entry points
# ----------------------------------------------------------------------------------------------------------------
def _run(rerank, model, data_loader, tokenizer, device, *, k_test, score, precision, image_states, progress,
         **kwargs) -> tuple[np.ndarray, np.ndarray]:
    check_score_mode(score)
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, data_loader, tokenizer, device, keep_states=score != 'itc',
                                 precision=precision, image_states=image_states, progress=progress)
        score_i2t, score_t2i = rerank(model, feats, k_test, score=score, precision=precision, progress=progress,
                                      **kwargs)
    finally:
        model.train(was_training)
    return score_i2t.float().cpu().numpy(), score_t2i.float().cpu().numpy()


def evaluate_fast(model, data_loader, tokenizer, device: torch.device, *, k_test: int, score: str = 'itm',
                  precision: str = 'fp32', itm_batch_size: int = 1024, image_states: str = 'auto',
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices (i2t [Ni, Nt], t2i [Nt, Ni], numpy float32) of the retrieval set behind `data_loader`.

    `model` is the unwrapped retrieval model; `data_loader` yields (images, indices) of a re_eval_dataset (every
    rank iterates the whole set). Every rank returns the reduced matrices.
    """
    return _run(rerank_fast, model, data_loader, tokenizer, device, k_test=k_test, score=score,
                precision=precision, image_states=image_states, progress=progress, itm_batch_size=itm_batch_size,
                release_text_states=True)


def evaluate_reference(model, data_loader, tokenizer, device: torch.device, *, k_test: int, score: str = 'itm',
                       precision: str = 'fp32', image_states: str = 'device',
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The same as `evaluate_fast` computed by the straightforward per-query loop (the original's algorithm)."""
    return _run(rerank_reference, model, data_loader, tokenizer, device, k_test=k_test, score=score,
                precision=precision, image_states=image_states, progress=progress)


def evaluate(model, data_loader, tokenizer, device: torch.device, *, k_test: int, score: str = 'itm',
             precision: str = 'fp32', itm_batch_size: int = 1024, image_states: str = 'auto', impl: str = 'fast',
             progress: bool = True) -> dict[str, float]:
    """R@K metrics (`itm_eval`) of the retrieval set behind `data_loader`, with the fast or reference re-ranking."""
    if impl == 'fast':
        scores = evaluate_fast(model, data_loader, tokenizer, device, k_test=k_test, score=score,
                               precision=precision, itm_batch_size=itm_batch_size, image_states=image_states,
                               progress=progress)
    elif impl == 'reference':
        scores = evaluate_reference(model, data_loader, tokenizer, device, k_test=k_test, score=score,
                                    precision=precision, image_states=image_states, progress=progress)
    else:
        raise utils.ConfigError(f"retrieval evaluation impl must be 'fast' or 'reference', got {impl!r}")
    dataset = data_loader.dataset
    return itm_eval(*scores, dataset.txt2img, dataset.img2txt)


class RetrievalEvaluator:
    """evaluate_fn for engine.fit: R@K of named splits, logged under the original's names (val_txt_r1 ...).

    Every evaluation is kept in the readable JSON `results_path` (with the settings used); `finish` adds the best
    epoch (the one whose checkpoint_best.pth engine.fit kept) and its metrics at the top level.
    """

    def __init__(self, model, loaders: Mapping, tokenizer, device: torch.device, *, k_test: int,
                 score: str = 'itm', precision: str = 'fp32', itm_batch_size: int = 1024,
                 image_states: str = 'auto', impl: str = 'fast', results_path: str | None = None,
                 resume: bool = False, extra: Mapping | None = None):
        self.model, self.loaders, self.tokenizer, self.device = model, dict(loaders), tokenizer, device
        self.options = dict(k_test=k_test, score=check_score_mode(score), precision=precision,
                            itm_batch_size=itm_batch_size, image_states=image_states, impl=impl)
        self.results_path = results_path
        self.results: dict = {'settings': {**self.options, **dict(extra or {})}, 'epochs': {}}
        if resume and results_path and os.path.isfile(results_path):  # keep the epochs evaluated before
            with open(results_path, encoding='utf-8') as f:
                self.results['epochs'] = json.load(f).get('epochs', {})

    def run(self, label: str) -> dict[str, dict]:
        """Metrics of every split (stored under `label` in the results file); returns {split: metrics}."""
        metrics = {}
        for split, loader in self.loaders.items():
            print(f'Evaluate {split} [{label}]: {len(loader.dataset)} images, {len(loader.dataset.text)} texts, '
                  f"k_test {self.options['k_test']}, score {self.options['score']}", flush=True)
            metrics[split] = evaluate(self.model, loader, self.tokenizer, self.device, **self.options)
            m = metrics[split]
            print(f"{split}: TR@1 {m['txt_r1']:.2f} TR@5 {m['txt_r5']:.2f} TR@10 {m['txt_r10']:.2f} | "
                  f"IR@1 {m['img_r1']:.2f} IR@5 {m['img_r5']:.2f} IR@10 {m['img_r10']:.2f} | "
                  f"r_mean {m['r_mean']:.2f}", flush=True)
        self.results['epochs'][label] = metrics
        self._write()
        return metrics

    @staticmethod
    def record(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The log.txt fields: '<split>_<metric>' (val_txt_r1 ... test_r_mean), as numbers."""
        return {f'{split}_{k}': v for split, m in metrics.items() for k, v in m.items()}

    def __call__(self, epoch: int) -> dict[str, float]:
        return self.record(self.run(str(epoch)))

    def finish(self, best_label) -> None:
        """Put the best evaluation's metrics at the top level of the results file."""
        if best_label is not None and str(best_label) in self.results['epochs']:
            self.results['best_epoch'] = best_label
            self.results.update(self.results['epochs'][str(best_label)])
        self._write()

    def _write(self) -> None:
        if self.results_path and utils.is_main_process():
            utils.atomic_write_text(self.results_path, json.dumps(self.results, indent=2) + '\n')
