"""ITM match logits of many (image, text) pairs of a retrieval model, batched for re-ranking.

The retrieval evaluation re-scores every (image, text) candidate pair with the ITM head on the fusion layers.
`model.itm_logits` does that for a batch of padded pairs; `ITMPairScorer` computes the same logits (fp32: equal
within float rounding) with much less work when the same images and texts recur across many pairs:

* the first fusion layer's self-attention sees only the text, so it is computed once per text;
* the cross-attention keys and values of an image are computed once per image and fusion layer, not per pair;
* padding tokens are masked out of every attention, so they cannot change the [CLS] state: the real tokens of
  all pairs are packed and the padding is never computed;
* the ITM head reads only [CLS], so the last fusion layer is evaluated for the [CLS] rows only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.xbert import SELF_MASK_VALUE, self_attention_mask
from utils import ConfigError


class ITMPairScorer:
    """ITM match logits of arbitrary (image, text) pairs, computed with the fusion layers of a retrieval model.

    Numerically the same function as `model.itm_logits(text_embeds[t], text_atts[t], image_embeds[i])[:, 1]`,
    evaluated with less work:

    * per text, once: the first fusion layer's self-attention block and its cross-attention queries (both see
      only the text), real tokens packed ([sum of lengths, H]);
    * per image of a batch, once: the cross-attention keys and values of every fusion layer;
    * per pair: the rest, on the packed real tokens of all pairs of the batch (grouped by image, so the tokens that
      attend to one image are contiguous); the last layer only for the [CLS] rows.

    It runs the model's own modules (the xbert layers' attention, crossattention, intermediate and output blocks,
    their query/key/value projections and `model.itm_head`); only the attention core is evaluated here, on packed
    tokens. The model must be in eval mode (no dropout). Precision is the caller's: construct and call the scorer
    under the autocast context wanted; with `compute_dtype` bfloat16 the fused projection weights are cast once.

    image_embeds [Ni, 1+P, Wv] ViT states (on any device; the rows a batch needs are moved to `device`),
    text_embeds [Nt, L, H] text-layer states and text_atts [Nt, L] their right-padded masks.
    """

    def __init__(self, model, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor,
                 device: torch.device, compute_dtype: torch.dtype | None = None, text_chunk: int = 256):
        encoder = model.text_encoder
        cfg = encoder.config
        self.layers = list(encoder.encoder.layer)[cfg.fusion_layer:]
        if not self.layers:
            raise ConfigError(f'bert_config: fusion_layer {cfg.fusion_layer} leaves no fusion layer for ITM '
                                    f'(num_hidden_layers {cfg.num_hidden_layers})')
        self.itm_head = model.itm_head
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.device = device
        self.image_embeds = image_embeds
        # Fused projections (one GEMM instead of two or three), cast once for bf16.
        dtype = compute_dtype
        self.cross_kv = [self._fuse(layer.crossattention.self.key, layer.crossattention.self.value, dtype=dtype)
                         for layer in self.layers]
        self.self_qkv = [self._fuse(layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                                    dtype=dtype) for layer in self.layers]
        self.self_kv = [self._fuse(layer.attention.self.key, layer.attention.self.value, dtype=dtype)
                        for layer in self.layers]
        self._build_text_cache(text_embeds, text_atts, text_chunk)

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
            raise ValueError('ITMPairScorer.score: pairs must be grouped by image')
        lengths = self.text_len[text_idx]
        n_pairs = lengths.numel()
        pair_start = torch.cumsum(lengths, 0) - lengths              # [CLS] row of each pair in the packed batch
        pair_of_tok = torch.repeat_interleave(torch.arange(n_pairs, device=device), lengths)
        pos = torch.arange(pair_of_tok.numel(), device=device) - pair_start[pair_of_tok]
        tok_per_image = torch.zeros(images.numel(), dtype=lengths.dtype, device=device).index_add_(
            0, torch.repeat_interleave(torch.arange(images.numel(), device=device), pairs_per_image), lengths)
        pairs_per_image, tok_per_image = pairs_per_image.tolist(), tok_per_image.tolist()
        rows = self.text_start[text_idx][pair_of_tok] + pos           # packed-cache row of every token

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
