"""Attention that can record its probabilities and their gradient (Grad-CAM), shared by the ViT and BERT layers.

Normal forwards use fused SDPA; a layer whose `save_attention` switch is on computes the softmax explicitly with
`recorded_attention`, keeps the probabilities and registers a hook that stores their gradient. `recording(...)`
switches it on for a block of code and afterwards drops what was stored.
"""
import contextlib

import torch


class AttentionRecorder:
    """Mixin for attention modules: the `save_attention` switch, the stored map/gradient and their accessors."""

    def init_recording(self):
        self.stop_recording()

    def stop_recording(self):
        """Switch recording off and drop the stored map and gradient (they hold the autograd graph of a batch)."""
        self.save_attention = False
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, grad):
        self.attn_gradients = grad

    def get_attn_gradients(self):
        """Gradient of the loss w.r.t. the recorded attention probabilities [B, heads, Lq, Lk]."""
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        """Attention probabilities [B, heads, Lq, Lk] recorded in the last forward with save_attention on."""
        return self.attention_map

    def recorded_attention(self, q, k, v, scale: float, mask=None, dropout=None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) @ v with the probabilities (and, in backward, their gradient) stored."""
        scores = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        self.save_attention_map(probs)
        if probs.requires_grad:
            probs.register_hook(self.save_attn_gradients)
        return (dropout(probs) if dropout is not None else probs) @ v


@contextlib.contextmanager
def recording(*modules: AttentionRecorder):
    """Record the attention of `modules` inside the block; on leaving it (also by an exception) stop recording."""
    for module in modules:
        module.save_attention = True
    try:
        yield modules
    finally:
        for module in modules:
            module.stop_recording()
