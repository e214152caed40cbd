"""Grad-CAM maps of an ALBEF retrieval/grounding model: one implementation for Grounding.py, Predict.py and
models/inference.py (the pictures drawn from the maps are in evaluation/figures.py).

Two modes, as the original's Grounding.py:

* ``itm``: gradient of the ITM "match" logit w.r.t. the cross-attention probabilities of one fusion layer
  (``block_num``, a BERT layer index), times those probabilities, positive part of the gradient only, averaged over
  heads. This gives one map per text token (``token_maps`` [B, L, gh, gw]) and a whole-sentence map.
* ``itc``: gradient of the ITC similarity image_feat . text_feat / temp w.r.t. the self-attention probabilities of
  one ViT block (``block_num``, a ViT block index), row of the image [CLS] query, times those probabilities,
  positive part of the gradient, averaged over heads: one map per image (no per-token maps).

The patch grid (gh, gw) is read from the model's ViT (image_res / patch_size), never assumed to be 24 x 24.
All maps are returned as float32 numpy arrays on the CPU.

Deliberate deviation from the original (documented, switchable): the original's grounding averages the per-token
maps over ALL padded text positions of the batch, so a sentence's map depends on the length of the longest sentence
in its batch (a constant factor per item). Here the sentence map is the sum of the token maps divided by the
number of real (non-padding) tokens, [CLS] included, so it does not depend on batching. Box choice is
invariant to a positive factor per map, so grounding accuracy is the same (up to ties/all-zero maps);
``sentence_average='padded'`` gives the original's values.

The gradient is taken with ``torch.autograd.grad`` w.r.t. the recorded attention probabilities (the models'
``get_attention_map()``), not with ``loss.backward()`` as the original does: the values are the same, but no
parameter ``.grad`` is written (so an evaluation between training epochs cannot leak into the optimizer) and no
gradient is computed for layers below the recorded one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.attention_recording import recording
from utils import ConfigError

MODES = ('itm', 'itc')
SENTENCE_AVERAGES = ('real', 'padded')


class GradCamError(ConfigError):
    """A Grad-CAM request that cannot be served (bad mode, layer index out of range). One line."""


@dataclass
class GradCamOutput:
    """Grad-CAM maps of a batch (numpy, float32).

    sentence_maps: [B, gh, gw] whole-sentence (itm) or whole-image (itc) map.
    token_maps: [B, L, gh, gw] one map per text position (itm only; padded positions are all zero), else None.
    attention_mask: [B, L] int64 text mask used (itm), else None.
    scores: [B] the score whose gradient was taken: the ITM match logit (itm) or the ITC similarity / temp (itc).
    itm_prob: [B] softmax probability of "match" (itm only), else None.
    mode, block_num: what produced the maps.
    """
    sentence_maps: np.ndarray
    token_maps: np.ndarray | None
    attention_mask: np.ndarray | None
    scores: np.ndarray
    itm_prob: np.ndarray | None
    mode: str
    block_num: int


# ----------------------------------------------------------------------------------------------------------------
# Layers and grid
# ----------------------------------------------------------------------------------------------------------------
def fusion_layers(model) -> range:
    """BERT layer indices that own cross-attention (the fusion layers) of `model.text_encoder`."""
    cfg = model.text_encoder.config
    return range(int(cfg.fusion_layer), int(cfg.num_hidden_layers))


def vision_blocks(model) -> range:
    """ViT block indices of `model.visual_encoder`."""
    return range(len(model.visual_encoder.blocks))


def default_block_num(model, mode: str) -> int:
    """The layer the original uses, generalised to any depth.

    itm: the third fusion layer (fusion_layer + 2; BERT layer 8 of bert-base), but never the last fusion layer
    when there are two or more: in the last layer only the [CLS] query reaches the ITM head, so every other token's
    map would be zero (the toy model, with two fusion layers, gets its first). itc: ViT block 2*depth // 3
    (block 8 of 12).
    """
    _check_mode(mode)
    if mode == 'itm':
        layers = fusion_layers(model)
        if len(layers) == 0:
            raise GradCamError('Grad-CAM itm: the text encoder has no fusion (cross-attention) layers')
        return max(layers.start, min(layers.start + 2, layers.stop - 2))
    return (2 * len(vision_blocks(model))) // 3


def check_block_num(model, mode: str, block_num: int | None) -> int:
    """Validate `block_num` for `mode` (None: `default_block_num`); returns the layer index to use.

    Raises GradCamError naming the allowed range when it is outside the fusion layers (itm) or ViT blocks (itc).
    """
    _check_mode(mode)
    if block_num is None:
        return default_block_num(model, mode)
    if isinstance(block_num, bool) or not isinstance(block_num, (int, np.integer)):
        raise GradCamError(f'--block_num must be an integer, got {block_num!r}')
    block_num = int(block_num)
    if mode == 'itm':
        layers = fusion_layers(model)
        if block_num not in layers:
            raise GradCamError(f'--block_num {block_num} is outside the fusion layers of this model '
                               f'({layers.start}..{layers.stop - 1}; BERT layer indices, gradcam_mode itm)')
    else:
        blocks = vision_blocks(model)
        if block_num not in blocks:
            raise GradCamError(f'--block_num {block_num} is outside the ViT blocks of this model '
                               f'(0..{blocks.stop - 1}; gradcam_mode itc)')
    return block_num


def patch_grid(model) -> tuple[int, int]:
    """(rows, cols) of the ViT patch grid: image_res // patch_size per side (e.g. 24 x 24 at 384 px, 16 px)."""
    gh, gw = model.visual_encoder.patch_embed.grid_size
    return int(gh), int(gw)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise GradCamError(f"gradcam mode must be one of {', '.join(MODES)}, got {mode!r}")


@contextlib.contextmanager
def _eval_mode(model):
    # Dropout must be off for a deterministic map; restore the caller's mode (training resumes afterwards).
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _map_and_gradient(attn_module, forward, where: str):
    """Run `forward() -> (score [B], extra)` with autograd on while `attn_module` records its attention, and
    return (probabilities, d score.sum() / d probabilities, score, extra); recording stops afterwards."""
    with recording(attn_module), torch.enable_grad():
        score, extra = forward()
        probs = attn_module.get_attention_map()
        if probs is None:
            raise RuntimeError(f'Grad-CAM: {where} recorded no attention map')
        grads, = torch.autograd.grad(score.sum(), probs)
        return probs.detach(), grads, score, extra


# ----------------------------------------------------------------------------------------------------------------
# Sentence averaging
# ----------------------------------------------------------------------------------------------------------------
def sentence_map(token_maps, attention_mask, average: str = 'real'):
    """Whole-sentence maps [B, gh, gw] from per-token maps [B, L, gh, gw] (torch or numpy).

    'real': sum over tokens / number of real tokens (mask 1, [CLS] included); 'padded': mean over all L
    positions, the original's behaviour (padded positions contribute zeros to the numerator only).
    """
    if average not in SENTENCE_AVERAGES:
        raise GradCamError(f"sentence average must be one of {', '.join(SENTENCE_AVERAGES)}, got {average!r}")
    is_np = isinstance(token_maps, np.ndarray)
    maps = torch.as_tensor(token_maps, dtype=torch.float32)
    mask = torch.as_tensor(attention_mask, dtype=torch.float32).to(maps.device)
    summed = (maps * mask[:, :, None, None]).sum(dim=1)
    if average == 'real':
        denom = mask.sum(dim=1).clamp(min=1.0)[:, None, None]
    else:
        denom = torch.full_like(summed[:, :1, :1], float(maps.shape[1]))
    out = summed / denom
    return out.numpy() if is_np else out


# ----------------------------------------------------------------------------------------------------------------
# The two Grad-CAM modes
# ----------------------------------------------------------------------------------------------------------------
def itm_gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int | None = None, sentence_average: str = 'real') -> GradCamOutput:
    """ITM Grad-CAM on the cross-attention of fusion layer `block_num` (default: `default_block_num`).

    image [B, 3, R, R], input_ids / attention_mask [B, L] on the model's device. Per item and text position i:
    map_i = mean_heads(A_i * relu(dS/dA_i)) over the image patches (image [CLS] column dropped), where A is the
    cross-attention probability and S the ITM match logit; rows of padded positions are zeroed.
    """
    block_num = check_block_num(model, 'itm', block_num)
    attn = model.text_encoder.encoder.layer[block_num].crossattention.self
    gh, gw = patch_grid(model)
    with _eval_mode(model):
        with torch.no_grad():
            # The unimodal encoders need no graph: only the fusion layers lie between the map and the score.
            image_embeds, _ = model.encode_image(image)
            text_embeds, _ = model.encode_text(input_ids, attention_mask)
        # Leaf that requires grad, so the fusion graph exists even when the model's parameters are frozen.
        image_embeds = image_embeds.detach().requires_grad_(True)

        def match_logit():
            logits = model.itm_logits(text_embeds, attention_mask, image_embeds)
            return logits[:, 1], logits
        probs, grads, score, logits = _map_and_gradient(attn, match_logit, f'fusion layer {block_num}')
    with torch.no_grad():
        B, H, L, n_img = probs.shape
        if n_img != 1 + gh * gw:
            raise RuntimeError(f'Grad-CAM: {n_img} image tokens do not match the {gh}x{gw} patch grid + [CLS]')
        mask = attention_mask.to(probs.dtype).view(B, 1, L, 1, 1)
        cams = probs[..., 1:].reshape(B, H, L, gh, gw) * mask
        grads = grads[..., 1:].reshape(B, H, L, gh, gw).clamp(min=0) * mask
        token_maps = (cams * grads).mean(dim=1).float()  # [B, L, gh, gw]
        sent = sentence_map(token_maps, attention_mask, sentence_average)
        return GradCamOutput(
            sentence_maps=sent.cpu().numpy(),
            token_maps=token_maps.cpu().numpy(),
            attention_mask=attention_mask.detach().cpu().long().numpy(),
            scores=score.detach().float().cpu().numpy(),
            itm_prob=F.softmax(logits.detach().float(), dim=1)[:, 1].cpu().numpy(),
            mode='itm', block_num=block_num)


def itc_gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int | None = None) -> GradCamOutput:
    """ITC Grad-CAM on the self-attention of ViT block `block_num` (default: `default_block_num`).

    Score S = image_feat . text_feat / temp (the item's own pair); map = mean_heads(A_0 * relu(dS/dA_0)) over the
    patches, where A_0 is the attention row of the image [CLS] query.
    """
    block_num = check_block_num(model, 'itc', block_num)
    attn = model.visual_encoder.blocks[block_num].attn
    gh, gw = patch_grid(model)
    with _eval_mode(model):
        with torch.no_grad():
            _, text_feat = model.encode_text(input_ids, attention_mask)
        # A leaf that requires grad keeps the ViT graph alive even with frozen parameters.
        image = image.detach().requires_grad_(True)

        def similarity():
            _, image_feat = model.encode_image(image, register_blk=block_num)
            return (image_feat * text_feat.to(image_feat.dtype)).sum(dim=1) / model.temp, None
        probs, grads, score, _ = _map_and_gradient(attn, similarity, f'ViT block {block_num}')
    with torch.no_grad():
        B, H, n_tok, _ = probs.shape
        if n_tok != 1 + gh * gw:
            raise RuntimeError(f'Grad-CAM: {n_tok} image tokens do not match the {gh}x{gw} patch grid + [CLS]')
        cam = probs[:, :, 0, 1:].reshape(B, H, gh, gw)
        grad = grads[:, :, 0, 1:].reshape(B, H, gh, gw).clamp(min=0)
        maps = (cam * grad).mean(dim=1).float()
        return GradCamOutput(sentence_maps=maps.cpu().numpy(), token_maps=None, attention_mask=None,
                             scores=score.detach().float().cpu().numpy(), itm_prob=None, mode='itc',
                             block_num=block_num)


def compute_gradcam(model, mode: str, image, input_ids, attention_mask, block_num: int | None = None,
                    sentence_average: str = 'real') -> GradCamOutput:
    """Dispatch to `itm_gradcam` or `itc_gradcam` by `mode`."""
    _check_mode(mode)
    if mode == 'itm':
        return itm_gradcam(model, image, input_ids, attention_mask, block_num, sentence_average)
    return itc_gradcam(model, image, input_ids, attention_mask, block_num)


# ----------------------------------------------------------------------------------------------------------------
# Words from word pieces
# ----------------------------------------------------------------------------------------------------------------
def merge_word_pieces(tokens: Sequence[str], token_maps: np.ndarray,
                      skip: Sequence[str] = ('[CLS]', '[SEP]', '[PAD]')) -> tuple[list[str], np.ndarray]:
    """Merge WordPiece tokens ('dog', '##gy') into words and average their maps.

    tokens: the L token strings of one text; token_maps: [L, gh, gw]. Special tokens in `skip` are dropped.
    Returns (words, word_maps [W, gh, gw]). A leading '##' piece (no word to attach to) starts a word.
    """
    if len(tokens) != len(token_maps):
        raise ValueError(f'merge_word_pieces: {len(tokens)} tokens but {len(token_maps)} maps')
    words: list[str] = []
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if tok in skip:
            continue
        if tok.startswith('##') and groups and groups[-1][-1] == i - 1:
            words[-1] += tok[2:]
            groups[-1].append(i)
        else:
            words.append(tok[2:] if tok.startswith('##') else tok)
            groups.append([i])
    maps = np.asarray(token_maps, dtype=np.float32)
    if not groups:
        return [], np.zeros((0,) + maps.shape[1:], dtype=np.float32)
    return words, np.stack([maps[g].mean(axis=0) for g in groups])
