"""ALBEF pretraining model: ITC + ITM (hard negatives) + MLM with momentum distillation (spec 6.2)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.common import (apply_grad_checkpointing, build_text_config, itm_hard_negatives, make_queue,
                           require_tokenizer)
from models.momentum import MomentumMixin, concat_all_gather, dequeue_and_enqueue
from models.vit import build_vit
from models.xbert import BertForMaskedLM


class ALBEF(MomentumMixin, nn.Module):
    """Pretraining model; forward(image, input_ids, attention_mask, alpha) -> {'loss_mlm','loss_ita','loss_itm'}."""

    def __init__(self, config, tokenizer):
        super().__init__()
        self.tokenizer = require_tokenizer(tokenizer, 'model_pretrain')
        self.mlm_probability = config.get('mlm_probability', 0.15)
        embed_dim = config.get('embed_dim', 256)
        vision_width = config.get('vision_width', 768)
        bert_config = build_text_config(config)
        text_width = bert_config.hidden_size

        self.temp = nn.Parameter(torch.tensor(float(config.get('temp', 0.07))))
        self.queue_size = config.get('queue_size', 65536)
        self.momentum = config.get('momentum', 0.995)
        self.register_buffer('image_queue', make_queue(embed_dim, self.queue_size))
        self.register_buffer('text_queue', make_queue(embed_dim, self.queue_size))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

        self.visual_encoder = build_vit(config)
        self.text_encoder = BertForMaskedLM(bert_config)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m = build_vit(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertForMaskedLM(bert_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [(self.visual_encoder, self.visual_encoder_m),
                            (self.vision_proj, self.vision_proj_m),
                            (self.text_encoder, self.text_encoder_m),
                            (self.text_proj, self.text_proj_m)]
        self.copy_params()
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder)

    # ----- unimodal / fusion pieces -----
    def encode_image(self, image):
        """image [B,3,R,R] -> (image_embeds [B,1+P,Wv], image_feat [B,D] L2-normalised)."""
        image_embeds = self.visual_encoder(image)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        """Text-only layers -> (text_embeds [B,L,H], text_feat [B,D] L2-normalised)."""
        text_embeds = self.text_encoder.bert(input_ids, attention_mask=attention_mask, mode='text').last_hidden_state
        return text_embeds, F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def fusion(self, text_embeds, text_atts, image_embeds, image_atts=None):
        """Fusion layers on text-mode states cross-attending to image tokens -> [B, L, H]."""
        return self.text_encoder.bert(encoder_embeds=text_embeds, attention_mask=text_atts,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                      mode='fusion').last_hidden_state

    def itm_logits(self, text_embeds, text_atts, image_embeds):
        """ITM logits [N, 2] (index 1 = match) of the fusion layers' [CLS] state."""
        return self.itm_head(self.fusion(text_embeds, text_atts, image_embeds)[:, 0, :])

    # ----- training -----
    def forward(self, image, input_ids, attention_mask, alpha=0.):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        with torch.no_grad():
            self._momentum_update()  # before the momentum features of this step
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t().float(), self.image_queue], dim=1)
            text_out_m = self.text_encoder_m.bert(input_ids, attention_mask=attention_mask,
                                                  mode='text').last_hidden_state
            text_feat_m = F.normalize(self.text_proj_m(text_out_m[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t().float(), self.text_queue], dim=1)
            sim_i2t_m = losses.similarity(image_feat_m, text_feat_all, self.temp)
            sim_t2i_m = losses.similarity(text_feat_m, image_feat_all, self.temp)
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
            targets_i2t = losses.distill_targets(sim_i2t_m, sim_targets, alpha)
            targets_t2i = losses.distill_targets(sim_t2i_m, sim_targets, alpha)

        sim_i2t = losses.similarity(image_feat, text_feat_all, self.temp)
        sim_t2i = losses.similarity(text_feat, image_feat_all, self.temp)
        loss_ita = losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        # ITM: positives + one hard negative image per text and one hard negative text per image.
        bs = image.size(0)
        with torch.no_grad():
            weights_i2t = F.softmax(sim_i2t[:, :bs].float(), dim=1)
            weights_t2i = F.softmax(sim_t2i[:, :bs].float(), dim=1)
            weights_i2t.fill_diagonal_(0)
            weights_t2i.fill_diagonal_(0)
        itm_logits, itm_labels = itm_hard_negatives(self, image_embeds, text_embeds, attention_mask,
                                                    weights_i2t, weights_t2i)
        loss_itm = losses.itm_loss(itm_logits, itm_labels)

        # MLM with distillation from the momentum model (soft labels only where the loss looks).
        ids, labels = losses.mask_tokens(input_ids, len(self.tokenizer), self.tokenizer.mask_token_id,
                                         self.tokenizer.pad_token_id, self.tokenizer.cls_token_id,
                                         self.mlm_probability)
        with torch.no_grad():
            logits_m = self.text_encoder_m(ids, attention_mask=attention_mask,
                                           encoder_hidden_states=image_embeds_m, return_logits=True,
                                           logits_positions=labels != -100)
            soft_labels = F.softmax(logits_m.float(), dim=-1)
        loss_mlm = self.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                     labels=labels, soft_labels=soft_labels, alpha=alpha).loss
        return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat):
        dequeue_and_enqueue([self.image_queue, self.text_queue], self.queue_ptr,
                            [concat_all_gather(image_feat), concat_all_gather(text_feat)])
