"""ALBEF retrieval / grounding fine-tuning model: ITC (idx-aware targets) + ITM."""
from functools import partial

import torch
import torch.nn as nn

from models import losses
from models.contrastive import ContrastiveMixin, itm_hard_negatives, itm_negative_weights
from models.encoder_config import build_text_config
from models.momentum import concat_all_gather, dequeue_and_enqueue
from models.xbert import BertModel


class ALBEFRetrieval(ContrastiveMixin, nn.Module):
    """forward(image, input_ids, attention_mask, idx, alpha) -> {'loss_ita', 'loss_itm'}.

    Inference pieces: encode_image, encode_text, itm_logits. Momentum encoders always exist (the queues hold
    momentum features) even when config['distill'] is False.
    """

    def __init__(self, config, tokenizer=None, inference=False):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config.get('distill', True)
        self._build_contrastive(config, build_text_config(config), partial(BertModel, add_pooling_layer=False),
                                idx_queue=True, inference=inference)

    def forward(self, image, input_ids, attention_mask, idx, alpha=0.):
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)  # all captions of an image share the mass

        with torch.no_grad():
            _, image_feat_m, image_feat_all, text_feat_m, text_feat_all = self._momentum_features(
                image, input_ids, attention_mask)
            if self.distill:
                sim_i2t_m = losses.similarity(image_feat_m, text_feat_all, self.temp)
                sim_t2i_m = losses.similarity(text_feat_m, image_feat_all, self.temp)
                targets_i2t = losses.distill_targets(sim_i2t_m, sim_targets, alpha)
                targets_t2i = losses.distill_targets(sim_t2i_m, sim_targets, alpha)
            else:
                targets_i2t = targets_t2i = sim_targets

        sim_i2t = losses.similarity(image_feat, text_feat_all, self.temp)
        sim_t2i = losses.similarity(text_feat, image_feat_all, self.temp)
        loss_ita = losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        bs = image.size(0)
        with torch.no_grad():
            # (The reference adds 1e-4 before the softmax, which cancels out.) Same-image pairs are no negatives.
            same_image = torch.eq(idx, idx.t())
            weights_i2t = itm_negative_weights(sim_i2t[:, :bs], same_image, self.itm_random_negatives)
            weights_t2i = itm_negative_weights(sim_t2i[:, :bs], same_image, self.itm_random_negatives)
        itm_logits, itm_labels = itm_hard_negatives(self, image_embeds, text_embeds, attention_mask,
                                                    weights_i2t, weights_t2i)
        loss_itm = losses.itm_loss(itm_logits, itm_labels)
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx):
        dequeue_and_enqueue([self.image_queue, self.text_queue, self.idx_queue], self.queue_ptr,
                            [concat_all_gather(image_feat), concat_all_gather(text_feat),
                             concat_all_gather(idx.view(-1))])


# Released code imports `from models.model_retrieval import ALBEF`.
ALBEF = ALBEFRetrieval
