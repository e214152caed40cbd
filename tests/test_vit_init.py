"""The ViT's from-scratch initialisation knob (vision_init_std)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit import build_vit

TINY = {'image_res': 32, 'patch_size': 8, 'vision_width': 64, 'vision_depth': 2, 'vision_num_heads': 4}


def _linear_weight_std(vit):
    return torch.cat([m.weight.flatten() for m in vit.modules() if isinstance(m, nn.Linear)]).std().item()


def test_default_init_std_is_the_originals():
    torch.manual_seed(0)
    # trunc_normal_ cuts at +-2 (absolute), far outside 0.02: the std stays ~0.02.
    assert abs(_linear_weight_std(build_vit(TINY)) - 0.02) < 0.001


def test_larger_init_std_makes_cls_features_of_different_images_differ():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)

    def mean_pairwise_cos(std):
        torch.manual_seed(1)
        vit = build_vit({**TINY, 'vision_init_std': std}).eval()
        with torch.no_grad():
            cls = F.normalize(vit(images)[:, 0], dim=-1)
        off_diagonal = ~torch.eye(len(images), dtype=torch.bool)
        return (cls @ cls.t())[off_diagonal].mean().item(), _linear_weight_std(vit)

    cos_small, std_small = mean_pairwise_cos(0.02)
    cos_large, std_large = mean_pairwise_cos(0.2)
    assert abs(std_large - 0.2) < 0.02 and abs(std_small - 0.02) < 0.002
    assert cos_small > 0.9            # the original init: [CLS] barely depends on the image
    assert cos_large < cos_small - 0.2


# ---- attention_qk_init_std: small query/key weights on top of a wide from-scratch init ----
def _wide_config(**extra):
    from tests.toy import TINY, TINY_BERT
    return {**TINY, 'bert_config': {**TINY_BERT, 'initializer_range': 0.2}, 'vision_init_std': 0.2, **extra}


def _query_key_value_weights(model):
    """{'qk': [...], 'v': [...]} weight tensors of every ViT and BERT attention layer of the online encoders."""
    from models.vit import RecordingAttention
    from models.xbert import BertSelfAttention
    found = {'qk': [], 'v': []}
    for name, module in model.named_modules():
        if '_m.' in name or name.endswith('_m'):
            continue
        if isinstance(module, RecordingAttention):
            found['qk'].append(module.qkv.weight[:2 * module.attn_dim])
            found['v'].append(module.qkv.weight[2 * module.attn_dim:])
        elif isinstance(module, BertSelfAttention):
            found['qk'] += [module.query.weight, module.key.weight]
            found['v'].append(module.value.weight)
    return found


def test_attention_qk_init_std_redraws_query_and_key_only():
    import models
    torch.manual_seed(0)
    model = models.create_model('ve', _wide_config(attention_qk_init_std=0.01))
    weights = _query_key_value_weights(model)
    # ViT (1 block) + BERT text self-attention (1 layer) + fusion self- and cross-attention (1 layer).
    assert len(weights['qk']) == 1 + 2 * 3 and len(weights['v']) == 4
    qk = torch.cat([w.flatten() for w in weights['qk']])
    v = torch.cat([w.flatten() for w in weights['v']])
    # a normal truncated at 2 std has 0.88 of its std
    assert abs(qk.std().item() - 0.0088) < 0.0008 and qk.abs().max().item() <= 0.02 + 1e-6
    assert abs(v.std().item() - 0.2) < 0.02  # the value path keeps the wide init
    torch.manual_seed(0)
    untouched = _query_key_value_weights(models.create_model('ve', _wide_config()))
    assert abs(torch.cat([w.flatten() for w in untouched['qk']]).std().item() - 0.2) < 0.02


def test_small_query_key_init_starts_attention_near_uniform():
    """With the wide init alone the attention of random images is near one-hot; small q/k make it near uniform."""
    from models import init_attention_query_key
    images = torch.randn(4, 3, 32, 32)

    def attention_max(qk_std):
        torch.manual_seed(1)
        vit = build_vit({**TINY, 'vision_init_std': 0.2}).eval()
        if qk_std is not None:
            init_attention_query_key(vit, qk_std)
        with torch.no_grad():
            vit(images, register_blk=0)
        return vit.blocks[0].attn.get_attention_map().max(dim=-1).values.mean().item()

    tokens = 1 + (32 // 8) ** 2
    assert attention_max(None) > 0.5            # most rows put over half their weight on one token
    assert attention_max(0.01) < 1.5 / tokens   # every row close to 1 / tokens
