"""`MomentumClassifier`: the [CLS]-classifier model with momentum distillation that the NLVR2 and SNLI-VE models
share, and its head `cls_head`."""
import torch
import torch.nn as nn

from models import losses
from models.encoder_config import apply_grad_checkpointing, build_text_config
from models.momentum import MomentumMixin
from models.vit import build_vit


def cls_head(width, num_classes):
    """Classifier Sequential(Linear(H,H), ReLU, Linear(H,n)) -> state keys cls_head.0.*, cls_head.2.*."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class MomentumClassifier(MomentumMixin, nn.Module):
    """Base of the NLVR2 and SNLI-VE models: ViT + multimodal text encoder + [CLS] classifier head, with momentum
    copies of all three for distillation when config['distill'] (the default).

    forward(image, input_ids, attention_mask, targets, alpha) -> {'loss'}; predict(...) -> logits
    [B, num_classes]. A subclass sets `num_classes` and defines `multimodal_hidden(image, input_ids,
    attention_mask, momentum=False) -> [B, L, H]`, which is where the two tasks differ (one image or an image
    pair); `build_text_encoder(bert_config)` builds its online and momentum text encoders.
    """

    num_classes: int

    def __init__(self, config, tokenizer, build_text_encoder, inference=False):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config.get('distill', True) and not inference
        self.momentum = config.get('momentum', 0.995)
        bert_config = build_text_config(config)
        width = bert_config.hidden_size

        # Construction order fixes the random initialisation: online modules first, then the momentum copies.
        self.visual_encoder = build_vit(config)
        self.text_encoder = build_text_encoder(bert_config)
        self.cls_head = cls_head(width, self.num_classes)
        if self.distill:
            self.visual_encoder_m = build_vit(config)
            self.text_encoder_m = build_text_encoder(bert_config)
            self.cls_head_m = cls_head(width, self.num_classes)
            self.model_pairs = [(self.visual_encoder, self.visual_encoder_m),
                                (self.text_encoder, self.text_encoder_m),
                                (self.cls_head, self.cls_head_m)]
            self.copy_params()
        else:
            self.model_pairs = []
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder)

    def multimodal_hidden(self, image, input_ids, attention_mask, momentum=False):
        raise NotImplementedError

    def predict(self, image, input_ids, attention_mask):
        """Class logits [B, num_classes] from the [CLS] state."""
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
