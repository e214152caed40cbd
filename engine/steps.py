"""Step functions shared by several task scripts: each factory returns `step(model, batch, alpha) -> {loss name:
tensor}` for `engine.train`, tokenizing a batch's text the way its task was trained by the original.

* `caption_step_fn` - (images, captions): pretraining (ITC, ITM, MLM) and text-assignment pretraining;
* `retrieval_step_fn` - (images, captions, image indices): retrieval and grounding fine-tuning (ITC, ITM);
* `classification_step_fn` - NLVR2 and SNLI-VE fine-tuning, given the script's batch layout (an `InputsFn`).
"""
from __future__ import annotations

from typing import Callable

import torch

# inputs_fn(batch, tokenizer, device, max_tokens) -> (images, input_ids, attention_mask, targets) on `device`;
# the one thing in which NLVR's and VE's batches differ (NLVR stacks its two images into one tensor).
InputsFn = Callable[[object, object, torch.device, int], tuple]

CAPTION_MAX_TOKENS = 25    # pretraining captions: truncated to 25 tokens
RETRIEVAL_MAX_TOKENS = 30  # retrieval captions: padded to the longest, max_length 30 without truncation


def caption_step_fn(tokenizer, device: torch.device, max_tokens: int = CAPTION_MAX_TOKENS, pass_alpha: bool = True):
    """Batch (images, captions) -> the model's losses (captions truncated to `max_tokens`).

    `pass_alpha=False` for models without distillation (text-assignment pretraining).
    """
    def step(model, batch, alpha):
        images, captions = batch
        text = tokenizer(list(captions), padding='longest', truncation=True, max_length=max_tokens,
                         return_tensors='pt')
        extra = {'alpha': alpha} if pass_alpha else {}
        return model(images.to(device, non_blocking=True), text.input_ids.to(device),
                     text.attention_mask.to(device), **extra)
    return step


def retrieval_step_fn(tokenizer, device: torch.device, max_tokens: int = RETRIEVAL_MAX_TOKENS,
                      position_limit: int | None = None):
    """Batch (images, captions, image indices) -> {'loss_ita', 'loss_itm'}.

    Captions: padding longest with max_length 30 but no truncation flag, so nothing is truncated (as the
    original) - up to `position_limit` tokens (the text encoder's max_position_embeddings), where a longer caption
    would crash the position embeddings: such a batch is tokenized again, truncated to the limit.
    """
    def step(model, batch, alpha):
        images, captions, idx = batch
        text = tokenizer(list(captions), padding='longest', max_length=max_tokens, return_tensors='pt')
        if position_limit is not None and text.input_ids.size(1) > position_limit:
            text = tokenizer(list(captions), padding='longest', truncation=True, max_length=position_limit,
                             return_tensors='pt')
        return model(images.to(device, non_blocking=True), text.input_ids.to(device), text.attention_mask.to(device),
                     idx.to(device, non_blocking=True), alpha=alpha)
    return step


def classification_step_fn(inputs_fn: InputsFn, tokenizer, device: torch.device, max_tokens: int):
    """Batch -> {'loss'}: the model's classification cross-entropy with distillation, on the (images, ids, mask,
    targets) that `inputs_fn` makes of the script's batch."""
    def step(model, batch, alpha):
        images, ids, mask, targets = inputs_fn(batch, tokenizer, device, max_tokens)
        return model(images, ids, mask, targets, alpha=alpha)
    return step
