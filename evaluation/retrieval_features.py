"""Unimodal features of a retrieval set, computed once per evaluation: every caption through the text layers,
every image through the ViT, and the ITC similarity of all pairs.

Captions are tokenized as the original (padding / truncation to 30 tokens) and encoded in chunks of 256; the
ViT states of large sets can be kept on the CPU (`image_states`), e.g. COCO-5k at 384 px holds 5000 x 577 x 768
floats = 8.9 GB in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import utils
from evaluation.common import progress_iter

IMAGE_STATE_PLACES = ('auto', 'device', 'cpu')
TEXT_CHUNK = 256        # captions per text-encoder call (the original's chunk)
TEXT_MAX_LENGTH = 30    # evaluation tokenization: padding/truncation to 30 tokens


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
    """Encode all captions of `data_loader.dataset.text` and all images of the loader.

    Captions are tokenized as the original (padding / truncation to `max_length` = 30) but encoded in chunks of
    similar length cut to their longest caption (same states, less work). Images are placed by the index the
    loader yields, so the row order is the dataset order whatever the loader order. With bf16 the ViT states
    are stored in bf16: the fusion layers' key/value projections (their only reader) cast them to bf16 under
    autocast anyway, so nothing changes but the memory.
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
    with utils.autocast(device, precision):
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
    with utils.autocast(device, precision):
        for image, index in progress_iter(data_loader, len(data_loader), 'Evaluation: encode images', progress):
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
