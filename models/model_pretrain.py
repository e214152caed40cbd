"""ALBEF pretraining model: ITC + ITM (hard negatives) + MLM with momentum distillation."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import losses
from models.contrastive import ContrastiveMixin, itm_hard_negatives, itm_negative_weights
from models.encoder_config import build_text_config
from models.momentum import concat_all_gather, dequeue_and_enqueue
from models.xbert import BertForMaskedLM
from utils import ConfigError


class ALBEFPretrain(ContrastiveMixin, nn.Module):
    """Pretraining model; forward(image, input_ids, attention_mask, alpha) -> {'loss_mlm','loss_ita','loss_itm'}."""

    def __init__(self, config, tokenizer, inference=False):
        super().__init__()
        if tokenizer is None:
            raise ConfigError('model_pretrain: a tokenizer is required (MLM masking reads its special ids)')
        self.tokenizer = tokenizer
        self.mlm_probability = config.get('mlm_probability', 0.15)
        self._build_contrastive(config, build_text_config(config), BertForMaskedLM, inference=inference)

    @staticmethod
    def _bert(text_encoder):
        # The MLM model wraps its BertModel; text-only and fusion passes go through that, without the MLM head.
        return text_encoder.bert

    # ----- training -----
    def forward(self, image, input_ids, attention_mask, alpha=0.):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        with torch.no_grad():
            image_embeds_m, image_feat_m, image_feat_all, text_feat_m, text_feat_all = self._momentum_features(
                image, input_ids, attention_mask)
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
            itself = torch.eye(bs, dtype=torch.bool, device=image.device)
            weights_i2t = itm_negative_weights(sim_i2t[:, :bs], itself, self.itm_random_negatives)
            weights_t2i = itm_negative_weights(sim_t2i[:, :bs], itself, self.itm_random_negatives)
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


# Released code imports `from models.model_pretrain import ALBEF`.
ALBEF = ALBEFPretrain
