"""The image-text contrastive (ITC) and matching (ITM) body shared by the pretraining and retrieval models:
`ContrastiveMixin` (encoders, projections, ITM head, feature queues, momentum copies), the queues' initial
contents, and the choice of ITM hard negatives."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder_config import apply_grad_checkpointing
from models.momentum import MomentumMixin
from models.vit import build_vit


def make_queue(dim, size):
    """Feature queue [dim, size] of random unit columns (float32)."""
    return F.normalize(torch.randn(dim, size), dim=0)


class ContrastiveMixin(MomentumMixin):
    """The ITC/ITM body shared by the pretraining and retrieval models.

    `_build_contrastive` creates, in the original's order (which fixes the random initialisation and the
    state-dict keys): temp, the feature queues, the online ViT / text encoder / projections / ITM head, and the
    momentum copies of the encoders and projections. The methods below are the unimodal and fusion pieces both
    models (and the Retrieval / Grad-CAM evaluators) call. A model whose text encoder wraps its BERT (the MLM
    model's `.bert`) overrides `_bert`.
    """

    @staticmethod
    def _bert(text_encoder):
        """The BertModel inside a text encoder (the encoder itself unless a subclass says otherwise)."""
        return text_encoder

    def _build_contrastive(self, config, bert_config, build_text_encoder, *, idx_queue=False, inference=False):
        """Create the ITC/ITM modules and queues on self; `idx_queue` adds retrieval's image-index queue.

        `inference` builds the online modules only (no feature queues, no momentum copies): about half the
        memory, enough for encode_image / encode_text / itm_logits and Grad-CAM, not for training.
        """
        embed_dim = config.get('embed_dim', 256)
        vision_width = config.get('vision_width', 768)
        text_width = bert_config.hidden_size

        self.temp = nn.Parameter(torch.tensor(float(config.get('temp', 0.07))))
        # learn_temp False keeps the temperature fixed (MoCo's choice from scratch): a learnable one can shrink until
        # near-identical features score apart, and the queue then separates by age instead of by content.
        self.temp.requires_grad_(bool(config.get('learn_temp', True)))
        self.queue_size = config.get('queue_size', 65536)
        self.momentum = config.get('momentum', 0.995)
        self.itm_random_negatives = config.get('itm_random_negatives', 0.0)  # see itm_negative_weights
        self.inference = inference
        if not inference:
            self.register_buffer('image_queue', make_queue(embed_dim, self.queue_size))
            self.register_buffer('text_queue', make_queue(embed_dim, self.queue_size))
            if idx_queue:  # -100: no image yet, so an empty slot never counts as a positive
                self.register_buffer('idx_queue', torch.full((1, self.queue_size), -100, dtype=torch.long))
            self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

        self.visual_encoder = build_vit(config)
        self.text_encoder = build_text_encoder(bert_config)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        if inference:
            self.model_pairs = []
            return

        self.visual_encoder_m = build_vit(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = build_text_encoder(bert_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [(self.visual_encoder, self.visual_encoder_m),
                            (self.vision_proj, self.vision_proj_m),
                            (self.text_encoder, self.text_encoder_m),
                            (self.text_proj, self.text_proj_m)]
        self.copy_params()
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder)

    def encode_image(self, image, register_blk=-1):
        """image [B,3,R,R] -> (image_embeds [B,1+P,Wv], image_feat [B,D] L2-normalised); ViT block
        `register_blk` records its attention (Grad-CAM)."""
        image_embeds = self.visual_encoder(image, register_blk=register_blk)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        """Text-only layers -> (text_embeds [B,L,H], text_feat [B,D] L2-normalised)."""
        text_embeds = self._bert(self.text_encoder)(input_ids, attention_mask=attention_mask,
                                                    mode='text').last_hidden_state
        return text_embeds, F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def fusion(self, text_embeds, text_atts, image_embeds, image_atts=None):
        """Fusion layers on text-mode states cross-attending to image tokens -> [B, L, H]."""
        return self._bert(self.text_encoder)(encoder_embeds=text_embeds, attention_mask=text_atts,
                                             encoder_hidden_states=image_embeds,
                                             encoder_attention_mask=image_atts, mode='fusion').last_hidden_state

    def itm_logits(self, text_embeds, text_atts, image_embeds):
        """ITM logits [N, 2] (index 1 = match; Retrieval ranks by it) from the fusion layers' [CLS] state."""
        return self.itm_head(self.fusion(text_embeds, text_atts, image_embeds)[:, 0, :])

    @torch.no_grad()
    def _momentum_features(self, image, input_ids, attention_mask):
        """EMA-update the momentum copies, then their ITC features of this batch, also against the queues.

        Returns (image_embeds_m, image_feat_m [B,D], image_feat_all [D,B+Q], text_feat_m [B,D],
        text_feat_all [D,B+Q]); the *_all are this batch's features (as fp32 columns) followed by the queue.
        """
        if self.inference:
            raise RuntimeError('this model was built for inference (no momentum copies or queues); it cannot train')
        self._momentum_update()  # before the momentum features of this step
        image_embeds_m = self.visual_encoder_m(image)
        image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t().float(), self.image_queue], dim=1)
        text_out_m = self._bert(self.text_encoder_m)(input_ids, attention_mask=attention_mask,
                                                     mode='text').last_hidden_state
        text_feat_m = F.normalize(self.text_proj_m(text_out_m[:, 0, :]), dim=-1)
        text_feat_all = torch.cat([text_feat_m.t().float(), self.text_queue], dim=1)
        return image_embeds_m, image_feat_m, image_feat_all, text_feat_m, text_feat_all


def itm_negative_weights(sim, not_negative, random_share=0.0):
    """Sampling weights of ITM negatives: row b weighs the in-batch candidates for query b.

    sim [B, B]: ITC similarities of the queries to the in-batch candidates; not_negative [B, B] bool: pairs
    never drawn (the positive itself; in retrieval every caption of the same image). The original draws by
    softmax(sim) (hard negatives). With `random_share` s > 0 the rows are (1 - s) * that distribution + s *
    uniform over the allowed candidates: from-scratch training (the toy world) needs easy negatives while the
    fusion layers learn to look at the image at all; with pretrained encoders s = 0 (the default) is the original.
    """
    weights = F.softmax(sim.float(), dim=1).masked_fill(not_negative, 0)
    allowed = (~not_negative).float()
    has_negative = allowed.sum(1) > 0
    if random_share:
        mixed = ((1 - random_share) * weights / weights.sum(1, keepdim=True)
                 + random_share * allowed / allowed.sum(1, keepdim=True))
        weights = torch.where(has_negative[:, None], mixed, weights)
    if not has_negative.all():
        # Every candidate of these rows is a positive: all pairs of the batch share one image (a rare batch of a
        # small retrieval set). torch.multinomial would stop the run; draw among the other items instead.
        others = (~torch.eye(len(weights), dtype=torch.bool, device=weights.device)).float()
        weights = torch.where(has_negative[:, None], weights, others)
    return weights


def itm_hard_negatives(model, image_embeds, text_embeds, text_atts, weights_i2t, weights_t2i):
    """ITM logits for B positives and 2B hard negatives, and their labels.

    For text b a negative image is drawn from weights_t2i[b]; for image b a negative text from weights_i2t[b]
    (torch.multinomial, images first). Rows: (text b, image b) x B, (text b, neg image) x B,
    (neg text, image b) x B; one fusion pass over all 3B pairs. Gradients flow into the chosen negatives.
    """
    bs = image_embeds.size(0)
    with torch.no_grad():
        neg_image_idx = torch.multinomial(weights_t2i, 1).squeeze(1)
        neg_text_idx = torch.multinomial(weights_i2t, 1).squeeze(1)
    text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text_idx]], dim=0)
    atts_all = torch.cat([text_atts, text_atts, text_atts[neg_text_idx]], dim=0)
    image_all = torch.cat([image_embeds, image_embeds[neg_image_idx], image_embeds], dim=0)
    logits = model.itm_logits(text_all, atts_all, image_all)
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(
        image_embeds.device)
    return logits, labels
