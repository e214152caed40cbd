"""ALBEF VQA model: multimodal question encoder + causal answer decoder with answer ranking."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder_config import apply_grad_checkpointing, build_text_config
from models.momentum import MomentumMixin
from models.vit import build_vit
from models.xbert import BertLMHeadModel, BertModel

# Decoder rows (question x candidate pairs) scored per call in rank_answer: bounds the logits' memory.
RANK_ROWS_PER_CALL = 256


class ALBEFVQA(MomentumMixin, nn.Module):
    """forward(image, q_ids, q_atts, answer_ids, answer_atts, weights, answers_per_question, alpha) -> {'loss'};
    predict(...) / rank_answer(...) -> (topk_ids, topk_probs).

    The decoder has config.get('vqa_decoder_layers', 6) layers, every one with cross-attention (fusion_layer 0)
    to the question states.
    """

    def __init__(self, config, tokenizer=None, inference=False):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config.get('distill', True) and not inference  # inference: no momentum copies
        self.momentum = config.get('momentum', 0.995)
        encoder_config = build_text_config(config)
        decoder_config = build_text_config(config, fusion_layer=0,
                                           num_hidden_layers=config.get('vqa_decoder_layers', 6),
                                           encoder_width=encoder_config.hidden_size)

        self.visual_encoder = build_vit(config)
        self.text_encoder = BertModel(encoder_config, add_pooling_layer=False)
        self.text_decoder = BertLMHeadModel(decoder_config)
        if self.distill:
            self.visual_encoder_m = build_vit(config)
            self.text_encoder_m = BertModel(encoder_config, add_pooling_layer=False)
            self.text_decoder_m = BertLMHeadModel(decoder_config)
            self.model_pairs = [(self.visual_encoder, self.visual_encoder_m),
                                (self.text_encoder, self.text_encoder_m),
                                (self.text_decoder, self.text_decoder_m)]
            self.copy_params()
        else:
            self.model_pairs = []
        apply_grad_checkpointing(config, self.visual_encoder, self.text_encoder, self.text_decoder)

    def encode_question(self, image, q_ids, q_atts, momentum=False):
        """Question states [B, Lq, H]: the whole text encoder, cross-attending to the image tokens."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        enc = self.text_encoder_m if momentum else self.text_encoder
        image_embeds = vit(image)
        return enc(q_ids, attention_mask=q_atts, encoder_hidden_states=image_embeds).last_hidden_state

    def forward(self, image, q_ids, q_atts, answer_ids, answer_atts, weights, answers_per_question, alpha=0.):
        """Training loss: sum over answers of weight * per-answer (distilled) NLL, divided by the batch size."""
        n = torch.as_tensor(answers_per_question, device=q_ids.device)
        answer_targets = answer_ids.masked_fill(answer_atts == 0, -100)  # padding is ignored
        question_states = self.encode_question(image, q_ids, q_atts)
        states = question_states.repeat_interleave(n, dim=0)
        atts = q_atts.repeat_interleave(n, dim=0)
        soft_labels = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                states_m = self.encode_question(image, q_ids, q_atts, momentum=True).repeat_interleave(n, dim=0)
                logits_m = self.text_decoder_m(answer_ids, attention_mask=answer_atts,
                                               encoder_hidden_states=states_m, encoder_attention_mask=atts,
                                               return_logits=True)
                soft_labels = F.softmax(logits_m.float(), dim=-1)
        answer_loss = self.text_decoder(answer_ids, attention_mask=answer_atts, encoder_hidden_states=states,
                                        encoder_attention_mask=atts, labels=answer_targets,
                                        soft_labels=soft_labels, alpha=alpha if self.distill else 0.,
                                        reduction='none').loss
        loss = (weights.to(answer_loss.dtype) * answer_loss).sum() / image.size(0)
        return {'loss': loss}

    @torch.no_grad()
    def predict(self, image, q_ids, q_atts, answer_ids, answer_atts, k):
        """Rank the candidate list for each question -> (topk_ids [B,k] into the list, topk_probs [B,k])."""
        question_states = self.encode_question(image, q_ids, q_atts)
        return self.rank_answer(question_states, q_atts, answer_ids, answer_atts, k)

    def first_token_probs(self, question_states, question_atts, answer_ids):
        """Softmax over the whole vocabulary of the decoder's first step (start = answer_ids[0, 0]), taken at
        each candidate's first answer token -> [Nq, Na]."""
        nq = question_states.size(0)
        start_ids = answer_ids[0, 0].repeat(nq, 1)
        logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts).logits[:, 0, :]
        return F.softmax(logits.float(), dim=1).index_select(1, answer_ids[:, 1])

    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Original VQA ranking: top-k candidates by first-token probability, re-scored by
        log(first-token prob) - sequence NLL, softmax over the k, re-sorted.

        Kept on purpose: the first answer token's log-probability is counted twice (it is in both terms), as
        in the reference implementation whose checkpoints and numbers we reproduce.
        """
        nq = question_states.size(0)
        k = min(k, answer_ids.size(0))
        prob_first = self.first_token_probs(question_states, question_atts, answer_ids)
        topk_probs, topk_ids = prob_first.topk(k, dim=1)
        flat = topk_ids.reshape(-1)
        input_ids = answer_ids.index_select(0, flat)
        input_atts = answer_atts.index_select(0, flat)
        targets = input_ids.masked_fill(input_atts == 0, -100)
        # Question states are passed once per question: the decoder's cross-attention serves the k candidate
        # rows of each question from one key/value projection (instead of k copies). Questions go through in
        # groups of about RANK_ROWS_PER_CALL candidate rows: the [rows, length, vocab] logits of one call are the
        # memory peak (16 questions x 128 candidates at BERT's vocabulary would be over 1 GB), and on CPU larger
        # calls are slower, not faster.
        per_call = max(1, RANK_ROWS_PER_CALL // k)
        answer_losses = []
        for q0 in range(0, nq, per_call):
            rows = slice(q0 * k, (q0 + per_call) * k)
            answer_losses.append(self.text_decoder(input_ids[rows], attention_mask=input_atts[rows],
                                                   encoder_hidden_states=question_states[q0:q0 + per_call],
                                                   encoder_attention_mask=question_atts[q0:q0 + per_call],
                                                   labels=targets[rows], reduction='none').loss)
        answer_loss = torch.cat(answer_losses)
        score = torch.log(topk_probs) - answer_loss.view(nq, k).float()
        probs = F.softmax(score, dim=1)
        topk_probs, rerank = probs.topk(k, dim=1)
        return torch.gather(topk_ids, 1, rerank), topk_probs


# Released code imports `from models.model_vqa import ALBEF`.
ALBEF = ALBEFVQA
