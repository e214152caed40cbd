"""ALBEF NLVR2 model: two images, 18-layer-rule text encoder with alternating cross-attention (spec 6.5)."""
import torch
import torch.nn as nn

from models import losses
from models.common import apply_grad_checkpointing, build_text_config, cls_head
from models.momentum import MomentumMixin
from models.vit import build_vit
from models.xbert import build_nlvr_text_encoder


class ALBEF(MomentumMixin, nn.Module):
    """forward(image, input_ids, attention_mask, targets, alpha) -> {'loss'}; predict(...) -> logits [B, 2].

    `image` is cat(all first images, all second images) along the batch ([2B, 3, R, R]). The text encoder has
    fusion_layer + 2 * (L - fusion_layer) layers; fusion layers at even offsets attend to the first image,
    odd offsets to the second; consecutive pairs share cross-attention key/value weights.
    """

    num_classes = 2

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config.get('distill', True)
        self.momentum = config.get('momentum', 0.995)
        bert_config = build_text_config(config)
        width = bert_config.hidden_size

        self.visual_encoder = build_vit(config)
        self.text_encoder = build_nlvr_text_encoder(bert_config)
        self.cls_head = cls_head(width, self.num_classes)
        if self.distill:
            self.visual_encoder_m = build_vit(config)
            self.text_encoder_m = build_nlvr_text_encoder(bert_config)
            self.cls_head_m = cls_head(width, self.num_classes)
            self.model_pairs = [(self.visual_encoder, self.visual_encoder_m),
                                (self.text_encoder, self.text_encoder_m),
                                (self.cls_head, self.cls_head_m)]
            self.copy_params()
        else:
            self.model_pairs = []
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder)

    def multimodal_hidden(self, image, input_ids, attention_mask, momentum=False):
        """All text layers with cross-attention alternating over the two images -> [B, L, H]."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        enc = self.text_encoder_m if momentum else self.text_encoder
        image0_embeds, image1_embeds = torch.split(vit(image), input_ids.size(0))
        return enc(input_ids, attention_mask=attention_mask, encoder_hidden_states=[image0_embeds, image1_embeds],
                   encoder_attention_mask=[None, None]).last_hidden_state

    def predict(self, image, input_ids, attention_mask):
        """Class logits [B, 2] from the [CLS] state."""
        return self.cls_head(self.multimodal_hidden(image, input_ids, attention_mask)[:, 0, :])

    def forward(self, image, input_ids, attention_mask, targets, alpha=0.):
        prediction = self.predict(image, input_ids, attention_mask)
        prediction_m = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                hidden_m = self.multimodal_hidden(image, input_ids, attention_mask, momentum=True)
                prediction_m = self.cls_head_m(hidden_m[:, 0, :])
        loss = losses.classification_loss(prediction, targets, prediction_m, alpha)
        return {'loss': loss}
