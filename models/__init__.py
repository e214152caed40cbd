"""ALBEF model variants. `create_model(task, config, tokenizer)` builds the random-initialised model of a task;
`load_model(checkpoint)` loads any checkpoint for inference (models/inference.py).

Weight loading is separate (models/pretrained.py, models/checkpoint.py); call `model.copy_params()` afterwards
on variants with momentum copies.
"""
import importlib

from models import config_checks  # noqa: F401  (declares the model's config checks to utils.config)
from utils import ConfigError

# task name -> (module, model class) of that task (grounding fine-tunes the retrieval model).
TASK_MODULES = {
    'pretrain': ('models.model_pretrain', 'ALBEFPretrain'),
    'retrieval': ('models.model_retrieval', 'ALBEFRetrieval'),
    'grounding': ('models.model_retrieval', 'ALBEFRetrieval'),
    'vqa': ('models.model_vqa', 'ALBEFVQA'),
    'nlvr': ('models.model_nlvr', 'ALBEFNLVR'),
    've': ('models.model_ve', 'ALBEFVE'),
    'pretrain_nlvr': ('models.model_pretrain_nlvr', 'ALBEFPretrainNLVR'),
}


def model_class(task):
    """The model class of a task name (see TASK_MODULES)."""
    if task not in TASK_MODULES:
        raise ConfigError(f'create_model: unknown task {task!r} (known: {", ".join(TASK_MODULES)})')
    # Imported lazily so that `import models` stays cheap and sub-modules can import each other freely.
    module, name = TASK_MODULES[task]
    return getattr(importlib.import_module(module), name)


def create_model(task, config, tokenizer=None, inference=False):
    """Build the task's ALBEF model from a config dict (sizes from config, random init).

    `inference=True` leaves out what only training needs (momentum copies, feature queues): see `load_model`.

    `attention_qk_init_std` (optional) re-draws the query and key projections of every attention layer (ViT
    self-attention, BERT self- and cross-attention) with that std: see `init_attention_query_key`.
    """
    model = model_class(task)(config, tokenizer, inference=inference)
    if config.get('attention_qk_init_std') is not None:
        init_attention_query_key(model, config['attention_qk_init_std'])
    return model


def init_attention_query_key(model, std):
    """Re-draw the query and key weights of every attention layer of `model` from N(0, std), truncated at 2 std.

    For models trained from scratch with a wide init (the toy configs' vision_init_std / initializer_range 0.2,
    chosen so that features of different inputs differ at the start), attention logits would start with a std
    of about 5: near one-hot attention on random tokens, whose softmax passes almost no gradient, so the fusion
    layers take far longer to learn where to look. Small query/key weights start every attention near uniform
    and leave the value path (what the features carry) at the wide init. Momentum copies are overwritten later
    by copy_params().
    """
    import torch
    from timm.layers import trunc_normal_
    from models.vit import RecordingAttention
    from models.xbert import BertSelfAttention

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RecordingAttention):
                qk = module.qkv.weight[:2 * module.attn_dim]  # rows: query, key, value
                trunc_normal_(qk, std=std, a=-2 * std, b=2 * std)
            elif isinstance(module, BertSelfAttention):
                for linear in (module.query, module.key):
                    trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)


def load_model(checkpoint, **kwargs):
    """Load a checkpoint (path or URL; released or ours) for inference: see `models.inference.load_model`."""
    from models.inference import load_model as _load_model
    return _load_model(checkpoint, **kwargs)
