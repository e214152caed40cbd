"""How an ALBEF config dict sets up the encoders: the text encoder's BertConfig (`build_text_config`) and
gradient checkpointing (`apply_grad_checkpointing`; the key is parsed by models.config_checks)."""
from models.config_checks import grad_checkpointing_targets
from models.xbert import build_bert_config, set_gradient_checkpointing
from utils import ConfigError


def build_text_config(config, **overrides):
    """BertConfig from config['bert_config'] (path or dict) for a text encoder reading ViT tokens.

    encoder_width (input width of cross-attention key/value) defaults to config['vision_width']; a bert config
    giving a different value cannot work and is refused with a one-line error. `overrides` win.
    """
    if 'bert_config' not in config:
        raise ConfigError("config: missing key 'bert_config'")
    cfg = build_bert_config(config['bert_config'], **overrides)
    if 'encoder_width' not in overrides:
        vision_width = config.get('vision_width', 768)
        given = getattr(cfg, 'encoder_width', None)
        if given is not None and given != vision_width:
            raise ConfigError(f'bert_config: encoder_width {given} != vision_width {vision_width}')
        cfg.encoder_width = vision_width
    return cfg


def apply_grad_checkpointing(config, visual_encoder, *text_modules):
    """Switch gradient checkpointing on the online encoders as config['grad_checkpointing'] asks."""
    parts = grad_checkpointing_targets(config)
    visual_encoder.set_grad_checkpointing('vision' in parts)
    for m in text_modules:
        set_gradient_checkpointing(m, 'text' in parts)
