"""ALBEF's BERT with fusion (cross-attention) layers.

transformers 5 cannot build a bidirectional encoder with cross-attention, so the whole stack is here, with the
state-dict names of the original (`embeddings.*`, `encoder.layer.N.attention.self.query`, ...,
`crossattention.*`, `cls.predictions.*`).

* Layers with index >= config.fusion_layer own a cross-attention block whose key/value projections take
  `config.encoder_width` inputs (the ViT width).
* `BertModel.forward(mode=...)`: 'text' runs layers [0, fusion_layer), 'fusion' runs [fusion_layer, L) starting
  from `encoder_embeds`, 'multi_modal' runs all layers.
* `encoder_hidden_states` may be a list (NLVR2): layer n uses element (n - fusion_layer) mod len(list).
* `encoder_hidden_states` (and its mask) may have B / r rows for B text rows: encoder row i serves text rows
  i*r .. i*r + r - 1, with its keys/values projected once (VQA ranks k answers per question this way).
* Masks: self-attention additive (1 - m) * -10000, cross-attention (1 - m) * -1e9 (the values of the reference
  code; a None encoder mask means "attend to everything" and skips the mask entirely).
* Attention uses F.scaled_dot_product_attention; a layer whose `save_attention` switch is on computes the
  softmax explicitly, keeps the probabilities and registers a hook for their gradient (Grad-CAM).
"""
import copy
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from models.attention_recording import AttentionRecorder
from models.losses import lm_loss, mlm_loss
from utils import ConfigError

SELF_MASK_VALUE = -10000.0
CROSS_MASK_VALUE = -1e9


def build_bert_config(bert_config, **overrides):
    """BertConfig from a JSON path, a dict or a BertConfig (copied), with attribute overrides applied.

    The ALBEF-specific fields fusion_layer (default: num_hidden_layers, i.e. no fusion layers) and
    encoder_width (default: hidden_size) are kept as attributes.
    """
    if isinstance(bert_config, BertConfig):
        cfg = copy.deepcopy(bert_config)
    elif isinstance(bert_config, dict):
        cfg = BertConfig.from_dict(dict(bert_config))
    elif isinstance(bert_config, (str, os.PathLike)):
        if not os.path.isfile(bert_config):
            raise ConfigError(f'bert_config: file not found: {bert_config}')
        try:
            with open(bert_config) as f:
                cfg = BertConfig.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ConfigError(f'bert_config: {bert_config} is not valid JSON ({e})') from None
    else:
        raise ConfigError(f'bert_config: expected a path, dict or BertConfig, got {type(bert_config).__name__}')
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if not hasattr(cfg, 'fusion_layer'):
        cfg.fusion_layer = cfg.num_hidden_layers
    return cfg


@dataclass
class BertEncoderOutput:
    """Output of BertModel: hidden states of the last executed layer [B, L, H] (+ pooler if built)."""
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None

    def __getitem__(self, i):
        return (self.last_hidden_state, self.pooler_output)[i]


@dataclass
class LMOutput:
    """Output of the MLM / LM wrappers: loss (None without labels) and logits."""
    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]


def _act(name):
    if name != 'gelu':
        raise ConfigError(f'bert_config hidden_act: only "gelu" (exact) is supported, got {name!r}')
    return nn.GELU()  # exact (erf) GELU, as the reference


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=getattr(config, 'pad_token_id', 0))
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent: the reference state dicts contain it.
        self.register_buffer('position_ids', torch.arange(config.max_position_embeddings).expand((1, -1)).clone())

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type = self.token_type_embeddings.weight[0]  # type 0 everywhere (ALBEF never passes types)
        else:
            token_type = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + token_type + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(AttentionRecorder, nn.Module):
    """Multi-head (self or cross) attention; cross-attention key/value take `encoder_width` inputs."""

    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f'bert_config: hidden_size {config.hidden_size} is not a multiple of '
                             f'num_attention_heads {config.num_attention_heads}')
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        # encoder_width: width of the tokens cross-attended to (ViT width); hidden size when absent.
        kv_width = config.hidden_size
        if is_cross_attention:
            kv_width = getattr(config, 'encoder_width', config.hidden_size)
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_cross_attention = is_cross_attention
        self.init_recording()

    def _heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        """attention_mask / encoder_attention_mask are additive masks broadcastable to [B, heads, Lq, Lk]."""
        q = self._heads(self.query(hidden_states))
        if self.is_cross_attention:
            kv_input, mask = encoder_hidden_states, encoder_attention_mask  # encoder mask replaces self mask
        else:
            kv_input, mask = hidden_states, attention_mask
        k = self._heads(self.key(kv_input))
        v = self._heads(self.value(kv_input))
        if mask is not None:
            mask = mask.to(q.dtype)
        group, rest = divmod(q.shape[0], k.shape[0])
        if rest:
            raise ValueError(f'cross-attention: {q.shape[0]} text rows are not a multiple of '
                             f'{k.shape[0]} encoder rows')
        if group > 1:
            if not self.save_attention:
                return self._grouped_cross_attention(q, k, v, mask, group)
            # A recorded map is per text row (Grad-CAM): give each row its own copy of the keys/values.
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            mask = None if mask is None else mask.repeat_interleave(group, dim=0)
        if self.save_attention:
            context = self.recorded_attention(q, k, v, self.attention_head_size ** -0.5, mask, self.dropout)
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.)
        B, _, L, _ = context.shape
        return context.transpose(1, 2).reshape(B, L, self.all_head_size)

    def _grouped_cross_attention(self, q, k, v, mask, group):
        """Cross-attention where each of the Bk encoder rows serves `group` consecutive query rows.

        Attention is independent per query position and the mask only covers keys, so the `group` rows' queries
        are folded into one longer query sequence per encoder row: keys/values are projected once per encoder row
        instead of once per query row (VQA answer ranking: k candidates share one question).
        """
        Bq, H, Lq, D = q.shape
        Bk = k.shape[0]
        folded = q.view(Bk, group, H, Lq, D).transpose(1, 2).reshape(Bk, H, group * Lq, D)
        context = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask,
                                                 dropout_p=self.dropout.p if self.training else 0.)
        context = context.view(Bk, H, group, Lq, D).permute(0, 2, 3, 1, 4)
        return context.reshape(Bq, Lq, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """Attention (`self`) followed by the output projection, dropout and residual LayerNorm (`output`)."""

    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        context = self.self(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask)
        return self.output(context, hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _act(config.hidden_act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """Self-attention, cross-attention (only if layer_num >= fusion_layer), feed-forward."""

    def __init__(self, config, layer_num):
        super().__init__()
        self.layer_num = layer_num
        self.fusion_layer = config.fusion_layer
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        attention_output = self.attention(hidden_states, attention_mask)
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f'BertLayer {self.layer_num}: cross-attention layer needs encoder_hidden_states')
            if isinstance(encoder_hidden_states, (list, tuple)):
                # NLVR2: consecutive fusion layers alternate over the list of image states.
                j = (self.layer_num - self.fusion_layer) % len(encoder_hidden_states)
                encoder_hidden_states = encoder_hidden_states[j]
                encoder_attention_mask = encoder_attention_mask[j]
            attention_output = self.crossattention(attention_output, None, encoder_hidden_states,
                                                   encoder_attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    """Layer stack; `mode` selects the slice that runs (text / fusion / multi_modal)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode):
        f, n = self.config.fusion_layer, self.config.num_hidden_layers
        if mode == 'text':
            return 0, f
        if mode == 'fusion':
            return f, n
        if mode == 'multi_modal':
            return 0, n
        raise ValueError(f"BertEncoder: unknown mode {mode!r} (expected 'text', 'fusion' or 'multi_modal')")

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, mode='multi_modal'):
        start, end = self.layer_range(mode)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(start, end):
            layer = self.layer[i]
            recording = layer.attention.self.save_attention or (
                layer.has_cross_attention and layer.crossattention.self.save_attention)
            if use_ckpt and not recording:
                hidden_states = checkpoint(layer, hidden_states, attention_mask, encoder_hidden_states,
                                           encoder_attention_mask, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


def _init_bert_weights(module, std):
    """BERT init: Linear/Embedding N(0, std), Linear biases 0, LayerNorm 1/0 (padding row not zeroed)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def self_attention_mask(attention_mask, dtype, is_decoder=False):
    """Additive self-attention mask: [B, L] -> [B, 1, 1, L] (encoder) or causal [B, 1, L, L] (decoder);
    [B, Lq, Lk] -> [B, 1, Lq, Lk]; values (1 - m) * -10000."""
    if attention_mask.dim() == 3:
        mask = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        if is_decoder:
            L = attention_mask.shape[1]
            causal = torch.ones(L, L, device=attention_mask.device).tril()
            mask = causal[None, None, :, :] * attention_mask[:, None, None, :]
        else:
            mask = attention_mask[:, None, None, :]
    else:
        raise ValueError(f'attention_mask: expected 2 or 3 dims, got shape {tuple(attention_mask.shape)}')
    return (1.0 - mask.to(dtype)) * SELF_MASK_VALUE


def cross_attention_mask(encoder_attention_mask, dtype):
    """Additive cross-attention mask [B, Lk] -> [B, 1, 1, Lk], (1 - m) * -1e9 (-1e4 in float16); None stays None."""
    if encoder_attention_mask is None:
        return None
    m = encoder_attention_mask
    if m.dim() == 2:
        m = m[:, None, None, :]
    elif m.dim() == 3:
        m = m[:, None, :, :]
    value = -1e4 if dtype == torch.float16 else CROSS_MASK_VALUE
    return (1.0 - m.to(dtype)) * value


class BertModel(nn.Module):
    """BERT body (embeddings + encoder, optional pooler) with ALBEF's fusion modes."""

    def __init__(self, config, add_pooling_layer=False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: _init_bert_weights(m, config.initializer_range))

    @property
    def base_model(self):
        return self

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                return_dict=True, is_decoder=False, mode='multi_modal'):
        """Run the layers selected by `mode`; with `encoder_embeds` the embedding layer is skipped.

        encoder_hidden_states: [B, Lk, encoder_width] or a list of them; encoder_attention_mask matches (None or
        a list of None = attend to all). Returns BertEncoderOutput (or a tuple when return_dict is False).
        """
        if input_ids is not None:
            ref = input_ids
        elif inputs_embeds is not None:
            ref = inputs_embeds
        elif encoder_embeds is not None:
            ref = encoder_embeds
        else:
            raise ValueError('BertModel: give input_ids, inputs_embeds or encoder_embeds')
        B, L = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, L, device=ref.device)
        dtype = self.embeddings.LayerNorm.weight.dtype
        ext_mask = self_attention_mask(attention_mask, dtype, is_decoder)

        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (list, tuple)):
                if encoder_attention_mask is None:
                    encoder_attention_mask = [None] * len(encoder_hidden_states)
                enc_mask = [cross_attention_mask(m, dtype) for m in encoder_attention_mask]
            else:
                enc_mask = cross_attention_mask(encoder_attention_mask, dtype)
        else:
            enc_mask = None

        if encoder_embeds is None:
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                     position_ids=position_ids, inputs_embeds=inputs_embeds)
        else:
            hidden = encoder_embeds
        hidden = self.encoder(hidden, ext_mask, encoder_hidden_states, enc_mask, mode=mode)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        if not return_dict:
            return (hidden, pooled) if pooled is not None else (hidden,)
        return BertEncoderOutput(last_hidden_state=hidden, pooler_output=pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _act(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """transform + decoder; `bias` is registered both here and as decoder.bias (same Parameter)."""

    def __init__(self, config):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class _BertWithHead(nn.Module):
    """`bert` (no pooler) + `cls` head whose decoder weight is the word-embedding matrix."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.cls.apply(lambda m: _init_bert_weights(m, config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        """Tie cls.predictions.decoder.weight to bert.embeddings.word_embeddings.weight (same Parameter)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def _body(self, input_ids, attention_mask, encoder_embeds, encoder_hidden_states, encoder_attention_mask,
              is_decoder, mode, token_type_ids=None, position_ids=None, inputs_embeds=None):
        return self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         position_ids=position_ids, inputs_embeds=inputs_embeds, encoder_embeds=encoder_embeds,
                         encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, is_decoder=is_decoder,
                         mode=mode).last_hidden_state


class BertForMaskedLM(_BertWithHead):
    """Masked LM used by pretraining: loss = (1 - alpha) CE_masked + alpha distill_masked."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, return_dict=True, is_decoder=False, mode='multi_modal', soft_labels=None, alpha=0.,
                return_logits=False, logits_positions=None):
        """MLM forward.

        return_logits: return the logits tensor [B, L, V] (or [M, V] at `logits_positions`, a bool [B, L], when
        given: the 30522-way head then runs only there). With labels, the head runs only at labelled
        positions (the loss never looks elsewhere) and LMOutput.logits holds those [M, V] logits.
        soft_labels: probabilities [B, L, V] or [M, V] (labelled positions, row-major).
        """
        hidden = self._body(input_ids, attention_mask, encoder_embeds, encoder_hidden_states,
                            encoder_attention_mask, is_decoder, mode, token_type_ids, position_ids, inputs_embeds)
        if return_logits:
            if logits_positions is not None:
                hidden = hidden[logits_positions]
            return self.cls(hidden)
        if labels is None:
            return LMOutput(loss=None, logits=self.cls(hidden))
        logits = self.cls(hidden[labels != -100])
        loss = mlm_loss(logits, labels, soft_labels=soft_labels, alpha=alpha)
        return LMOutput(loss=loss, logits=logits)


class BertLMHeadModel(_BertWithHead):
    """Causal LM (the VQA answer decoder): per-sequence summed NLL with reduction='none'."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, return_dict=True, is_decoder=True, reduction='mean', mode='multi_modal',
                soft_labels=None, alpha=0., return_logits=False):
        """Decoder forward with the causal mask.

        return_logits: logits[:, :-1] (position t predicts token t+1). labels: shifted next-token CE; with
        reduction='none' the result is the per-sequence sum [B]. soft_labels [B, L-1, V] mix in distillation.
        """
        hidden = self._body(input_ids, attention_mask, encoder_embeds, encoder_hidden_states,
                            encoder_attention_mask, is_decoder, mode, token_type_ids, position_ids, inputs_embeds)
        if return_logits:
            return self.cls(hidden[:, :-1])
        logits = self.cls(hidden)
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels, soft_labels=soft_labels, alpha=alpha, reduction=reduction)
        return LMOutput(loss=loss, logits=logits)


def share_cross_attention(encoder):
    """Tie cross-attention key/value weight+bias of layers (f+2i, f+2i+1) to the same Parameter objects.

    Layer f+2i takes layer f+2i+1's Parameters (so, loading a state dict into the shared tensors, the later
    layer's entry wins, as in the reference). Query and everything else stay separate.
    """
    f = encoder.config.fusion_layer
    n = encoder.config.num_hidden_layers
    for i in range((n - f) // 2):
        first = encoder.layer[f + 2 * i].crossattention.self
        second = encoder.layer[f + 2 * i + 1].crossattention.self
        for name in ('key', 'value'):
            getattr(first, name).weight = getattr(second, name).weight
            getattr(first, name).bias = getattr(second, name).bias


def nlvr_num_layers(config):
    """Depth of an NLVR2-style encoder: fusion_layer + 2 * (num_hidden_layers - fusion_layer) (18 for BERT-base)."""
    return config.fusion_layer + 2 * (config.num_hidden_layers - config.fusion_layer)


def build_nlvr_text_encoder(config):
    """BertModel with the NLVR2 depth rule and shared cross-attention key/value pairs."""
    cfg = build_bert_config(config, num_hidden_layers=nlvr_num_layers(config))
    model = BertModel(cfg, add_pooling_layer=False)
    share_cross_attention(model.encoder)
    return model


def set_gradient_checkpointing(module, enable=True):
    """Switch gradient checkpointing on every BertEncoder inside module."""
    for m in module.modules():
        if isinstance(m, BertEncoder):
            m.gradient_checkpointing = bool(enable)
