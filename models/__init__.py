"""ALBEF model variants. `create_model(task, config, tokenizer)` builds the random-initialised model of a task.

Weight loading is separate (models/pretrained.py, models/checkpoint.py); call `model.copy_params()` afterwards
on variants with momentum copies.
"""
import importlib

from utils import ConfigError

# task name -> module holding that task's `ALBEF` class (grounding fine-tunes the retrieval model).
TASK_MODULES = {
    'pretrain': 'models.model_pretrain',
    'retrieval': 'models.model_retrieval',
    'grounding': 'models.model_retrieval',
    'vqa': 'models.model_vqa',
    'nlvr': 'models.model_nlvr',
    've': 'models.model_ve',
    'pretrain_nlvr': 'models.model_pretrain_nlvr',
}


def model_class(task):
    """The ALBEF class for a task name (see TASK_MODULES)."""
    if task not in TASK_MODULES:
        raise ConfigError(f'create_model: unknown task {task!r} (known: {", ".join(TASK_MODULES)})')
    # Imported lazily so that `import models` stays cheap and sub-modules can import each other freely.
    return importlib.import_module(TASK_MODULES[task]).ALBEF


def create_model(task, config, tokenizer=None):
    """Build the task's ALBEF model from a config dict (sizes from config, random init)."""
    return model_class(task)(config, tokenizer)
