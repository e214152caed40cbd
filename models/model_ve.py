"""ALBEF SNLI-VE model: multimodal encoder + 3-way classifier."""
from functools import partial

from models.classifier import MomentumClassifier
from models.xbert import BertModel


class ALBEFVE(MomentumClassifier):
    """forward(image, input_ids, attention_mask, targets, alpha) -> {'loss'}; predict(...) -> logits [B, 3]
    (0 contradiction, 1 neutral, 2 entailment)."""

    num_classes = 3

    def __init__(self, config, tokenizer=None, inference=False):
        super().__init__(config, tokenizer, partial(BertModel, add_pooling_layer=False), inference)

    def multimodal_hidden(self, image, input_ids, attention_mask, momentum=False):
        """All text layers, cross-attending to the image tokens -> [B, L, H]."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        enc = self.text_encoder_m if momentum else self.text_encoder
        return enc(input_ids, attention_mask=attention_mask, encoder_hidden_states=vit(image)).last_hidden_state


# Released code imports `from models.model_ve import ALBEF`.
ALBEF = ALBEFVE
