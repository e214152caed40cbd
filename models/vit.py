"""Vision Transformer used by every ALBEF variant.

Built from timm's `PatchEmbed` and `Block` so that the state-dict names are exactly the ones of the original
(`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`; no classification head).  Attention runs through fused SDPA, except in the one block asked to record its
attention probabilities (Grad-CAM), which computes the softmax explicitly and keeps the probabilities and their
gradient.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed, trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

from models.attention_recording import AttentionRecorder


class RecordingAttention(AttentionRecorder, Attention):
    """timm self-attention with an explicit-softmax path that records probabilities and their gradient.

    `save_attention` is switched on by `VisionTransformer.forward` for the block named by `register_blk`.
    Parameter names (`qkv`, `proj`) are timm's, hence identical to the original ViT.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_recording()

    def forward(self, x, attn_mask=None, is_causal=False):
        """Multi-head self-attention over all tokens of x [B, N, C]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.save_attention:
            x = self.recorded_attention(q, k, v, self.scale, dropout=self.attn_drop)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))


class VisionTransformer(nn.Module):
    """ViT returning all tokens after the final LayerNorm ([B, 1 + P, width], token 0 = CLS)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=True, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 norm_layer=None, init_std=.02):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                  act_layer=nn.GELU, attn_layer=RecordingAttention)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(partial(self._init_weights, std=init_std))

    @staticmethod
    def _init_weights(m, std=.02):
        # Linear: truncated normal (0.02 as the original), zero bias; LayerNorm 1/0; the patch Conv2d keeps
        # PyTorch's default. A larger std only matters for models trained from scratch (the toy world): with 0.02
        # the [CLS] output hardly depends on the image at start, so contrastive training begins collapsed.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = bool(enable)

    def forward(self, x, register_blk=-1):
        """Encode images x [B, 3, R, R]; block `register_blk` records attention probabilities (+ gradients)."""
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        x = self.pos_drop(x)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            record = i == register_blk
            blk.attn.save_attention = record
            # The recording block is never checkpointed: recomputation would replace the stored map.
            if use_ckpt and not record:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def build_vit(config):
    """Build the ViT from an ALBEF config dict (image_res, patch_size, vision_width, vision_depth,
    vision_num_heads, mlp_ratio, vision_init_std)."""
    return VisionTransformer(
        img_size=config['image_res'],
        patch_size=config.get('patch_size', 16),
        embed_dim=config.get('vision_width', 768),
        depth=config.get('vision_depth', 12),
        num_heads=config.get('vision_num_heads', 12),
        mlp_ratio=config.get('mlp_ratio', 4),
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        init_std=config.get('vision_init_std', .02),
    )
