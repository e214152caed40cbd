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
