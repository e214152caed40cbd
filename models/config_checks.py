"""The model's config keys beyond their types: the BERT config (`bert_config`, inline or a JSON file), the keys
that must agree with each other (image_res / patch_size, widths / heads, the feature queue), grad_checkpointing.

Declared to utils.config (register_check) when the models package is imported, so that a config is refused when
it is loaded, before anything is built.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

from utils.config import register_check
from utils.errors import ConfigError
from utils.files import read_limited
from utils.schema import NUM, SHARE, Spec, size_spec

# The BERT config (`bert_config`: inline, or a JSON file): only the keys ALBEF builds from are checked; others
# (architectures, model_type, ...) pass through to transformers' BertConfig.
BERT_SCHEMA: dict[str, Spec] = {
    'hidden_size': size_spec(16384), 'num_attention_heads': size_spec(1024), 'num_hidden_layers': size_spec(256),
    'intermediate_size': size_spec(65536), 'vocab_size': size_spec(1 << 21),
    'max_position_embeddings': size_spec(65536), 'type_vocab_size': size_spec(1024),
    'encoder_width': size_spec(16384), 'fusion_layer': Spec((int,), 0),
    'hidden_dropout_prob': SHARE, 'attention_probs_dropout_prob': SHARE,
    'layer_norm_eps': Spec(NUM, 0, lo_open=True), 'initializer_range': Spec(NUM, 0),
}
# Defaults the models apply when a key is absent (models/vit.py, models/encoder_config.py, BertConfig), for the checks
# that relate keys to each other.
MODEL_DEFAULTS = {'patch_size': 16, 'vision_width': 768, 'vision_num_heads': 12, 'embed_dim': 256,
                  'queue_size': 65536}
BERT_DEFAULTS = {'hidden_size': 768, 'num_attention_heads': 12, 'num_hidden_layers': 12}
MAX_QUEUE_FLOATS = 1 << 28  # queue_size * embed_dim: 1 GiB per fp32 queue (the original's is 64 MiB)
GRAD_CHECKPOINTING_PARTS = ('vision', 'text')


def grad_checkpointing_targets(config: Mapping, where: str = 'config') -> set[str]:
    """Parse config['grad_checkpointing'] (bool, or a list of parts from GRAD_CHECKPOINTING_PARTS) -> set of
    parts. `where` names the config in the error."""
    value = config.get('grad_checkpointing', False)
    if isinstance(value, bool):
        return set(GRAD_CHECKPOINTING_PARTS) if value else set()
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if v not in GRAD_CHECKPOINTING_PARTS]
        if bad:
            raise ConfigError(f"{where}: key 'grad_checkpointing' entries must be 'vision' or 'text', got {bad}")
        return set(value)
    raise ConfigError(f"{where}: key 'grad_checkpointing' must be bool or list, got {value!r}")


def _load_bert_json(path: str, bert_path: str) -> Mapping | None:
    """The BERT config JSON named by `bert_config`, for its checks; None when it is not there (the model build
    reports a missing file)."""
    if not os.path.exists(bert_path):
        return None
    try:
        data = read_limited(bert_path, 'bert_config file')
    except ConfigError as e:
        raise ConfigError(f"{path}: key 'bert_config': {e}") from None
    try:
        value = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: key 'bert_config': {bert_path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: key 'bert_config': {bert_path} must hold a JSON object, got "
                          f'{type(value).__name__}')
    return value


def _check_bert(path: str, config: Mapping) -> None:
    """Types, ranges and shape of the BERT config (inline dict, or the JSON file it names)."""
    raw = config['bert_config']
    if isinstance(raw, dict):
        bert, where = raw, f"{path}: key 'bert_config."
    else:
        bert, where = _load_bert_json(path, raw), f"{path}: bert_config {raw}: key '"
        if bert is None:
            return
    for key, spec in BERT_SCHEMA.items():
        if key in bert:
            found = spec.problem(bert[key])
            if found is not None:
                raise ConfigError(f"{where}{key}' {found}")
    b = {**BERT_DEFAULTS, **bert}
    if b['hidden_size'] % b['num_attention_heads']:
        raise ConfigError(f"{where}hidden_size' ({b['hidden_size']}) is not divisible by 'num_attention_heads' "
                          f"({b['num_attention_heads']}): each head gets an equal share of the width")
    if 'fusion_layer' in b and b['fusion_layer'] > b['num_hidden_layers']:
        raise ConfigError(f"{where}fusion_layer' ({b['fusion_layer']}) is larger than 'num_hidden_layers' "
                          f"({b['num_hidden_layers']})")


def _check_relations(path: str, config: Mapping) -> None:
    """Checks between keys (the models' defaults stand in for absent ones)."""
    c = {**MODEL_DEFAULTS, **config}

    def given(key):  # how the message shows a value the config may not hold itself
        return f"'{key}' ({c[key]}{'' if key in config else ', the default'})"
    if 'image_res' in config:
        if c['patch_size'] > c['image_res']:
            raise ConfigError(f"{path}: key {given('patch_size')} is larger than 'image_res' ({c['image_res']})")
        if c['image_res'] % c['patch_size']:
            raise ConfigError(f"{path}: key 'image_res' ({c['image_res']}) is not a multiple of "
                              f"{given('patch_size')}: the border pixels would be dropped; use "
                              f"{c['image_res'] // c['patch_size'] * c['patch_size']} or "
                              f"{-(-c['image_res'] // c['patch_size']) * c['patch_size']}")
    if ('vision_width' in config or 'vision_num_heads' in config) and c['vision_width'] % c['vision_num_heads']:
        raise ConfigError(f"{path}: key {given('vision_width')} is not divisible by {given('vision_num_heads')}: "
                          f"each head gets an equal share of the width")
    if 'queue_size' in config and c['queue_size'] * c['embed_dim'] > MAX_QUEUE_FLOATS:
        raise ConfigError(f"{path}: key {given('queue_size')} times {given('embed_dim')} is "
                          f"{c['queue_size'] * c['embed_dim']} values per feature queue, more than the "
                          f"{MAX_QUEUE_FLOATS} ({MAX_QUEUE_FLOATS * 4 >> 30} GiB) that fit beside a model")
    if 'queue_size' in config:
        for bkey in ('batch_size', 'batch_size_train'):
            if bkey in config and config['queue_size'] < config[bkey]:
                raise ConfigError(f"{path}: key 'queue_size' ({config['queue_size']}) is smaller than "
                                  f"'{bkey}' ({config[bkey]}); the queue must hold at least one batch")
    if 'bert_config' in config:
        _check_bert(path, config)


def check_model_config(path: str, config: Mapping) -> None:
    """The registered check: grad_checkpointing's parts, then the relations between the model's keys."""
    if 'grad_checkpointing' in config:
        grad_checkpointing_targets(config, path)
    _check_relations(path, config)


register_check(check_model_config)
