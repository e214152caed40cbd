"""ALBEF NLVR2 model: two images, 18-layer-rule text encoder with alternating cross-attention."""
import torch

from models.classifier import MomentumClassifier
from models.xbert import build_nlvr_text_encoder


class ALBEFNLVR(MomentumClassifier):
    """forward(image, input_ids, attention_mask, targets, alpha) -> {'loss'}; predict(...) -> logits [B, 2].

    `image` is cat(all first images, all second images) along the batch ([2B, 3, R, R]). The text encoder has
    fusion_layer + 2 * (L - fusion_layer) layers; fusion layers at even offsets attend to the first image,
    odd offsets to the second; consecutive pairs share cross-attention key/value weights.
    """

    num_classes = 2

    def __init__(self, config, tokenizer=None, inference=False):
        super().__init__(config, tokenizer, build_nlvr_text_encoder, inference)

    def multimodal_hidden(self, image, input_ids, attention_mask, momentum=False):
        """All text layers with cross-attention alternating over the two images -> [B, L, H]."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        enc = self.text_encoder_m if momentum else self.text_encoder
        image0_embeds, image1_embeds = torch.split(vit(image), input_ids.size(0))
        return enc(input_ids, attention_mask=attention_mask, encoder_hidden_states=[image0_embeds, image1_embeds],
                   encoder_attention_mask=[None, None]).last_hidden_state


# Released code imports `from models.model_nlvr import ALBEF`.
ALBEF = ALBEFNLVR
