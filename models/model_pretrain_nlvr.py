"""ALBEF text-assignment ("TA") pretraining for NLVR2."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.encoder_config import apply_grad_checkpointing, build_text_config
from models.momentum import MomentumMixin
from models.vit import build_vit
from models.xbert import build_nlvr_text_encoder

# The reference hard-codes this temperature for the image-image similarity; `temp` below is never used.
TA_TEMPERATURE = 0.07


class ALBEFPretrainNLVR(MomentumMixin, nn.Module):
    """forward(image, input_ids, attention_mask) -> {'loss'}: for caption b, classify an image pair as
    0 (caption describes the first image), 1 (the second) or 2 (neither). Needs a batch of at least 3.

    `temp` and `text_proj` exist for state-dict compatibility but are unused (as in the reference);
    vision_proj is used only under no_grad to pick similar images. There is no momentum model: copy_params()
    exists (uniform API for loaders) and does nothing.
    """

    def __init__(self, config, tokenizer=None, inference=False):  # no momentum copies either way
        super().__init__()
        self.tokenizer = tokenizer
        embed_dim = config.get('embed_dim', 256)
        vision_width = config.get('vision_width', 768)
        bert_config = build_text_config(config)
        width = bert_config.hidden_size

        self.temp = nn.Parameter(torch.tensor(float(config.get('temp', 0.07))))
        self.visual_encoder = build_vit(config)
        self.text_encoder = build_nlvr_text_encoder(bert_config)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.ta_head = nn.Linear(width, 3)
        self.model_pairs = []
        self.momentum = 0.
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder)

    def image_feat(self, image_embeds):
        """L2-normalised vision_proj of the [CLS] token -> [B, D]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def ta_logits(self, image0_embeds, image1_embeds, input_ids, attention_mask):
        """TA logits [B, 3] for text b with the pair (image0_embeds[b], image1_embeds[b])."""
        output = self.text_encoder(input_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=[image0_embeds, image1_embeds],
                                   encoder_attention_mask=[None, None]).last_hidden_state
        return self.ta_head(output[:, 0, :])

    @torch.no_grad()
    def sample_pairs(self, image_embeds):
        """Draw (first index, second index, label) per caption b with torch's RNG, in the original's draw order.

        With prob. 2/3 one similar image j != b is drawn and the pair is (b, j) label 0 or (j, b) label 1 (half
        each); otherwise two distinct similar images (i, j), both != b, label 2.
        """
        bs = image_embeds.size(0)
        if bs < 3:
            raise ValueError(f'model_pretrain_nlvr: batch size {bs} < 3 (label 2 needs two other images)')
        feat = self.image_feat(image_embeds)
        sim = losses.similarity(feat, feat.t(), TA_TEMPERATURE)
        weights = F.softmax(sim, dim=1)
        weights.fill_diagonal_(0)
        device = image_embeds.device
        one = torch.rand(bs, device=device) > 1 / 3
        first_is_b = torch.rand(bs, device=device) > 0.5
        single = torch.multinomial(weights, 1).squeeze(1)
        double = torch.multinomial(weights, 2)
        b = torch.arange(bs, device=device)
        idx0 = torch.where(one, torch.where(first_is_b, b, single), double[:, 0])
        idx1 = torch.where(one, torch.where(first_is_b, single, b), double[:, 1])
        labels = torch.where(one, torch.where(first_is_b, 0, 1), 2).long()
        return idx0, idx1, labels

    def forward(self, image, input_ids, attention_mask):
        image_embeds = self.visual_encoder(image)
        idx0, idx1, labels = self.sample_pairs(image_embeds)
        logits = self.ta_logits(image_embeds[idx0], image_embeds[idx1], input_ids, attention_mask)
        return {'loss': losses.classification_loss(logits, labels)}


# Released code imports `from models.model_pretrain_nlvr import ALBEF`.
ALBEF = ALBEFPretrainNLVR
