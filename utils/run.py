"""What every task script does before it builds data and model: config, text encoder folders, distributed
start-up, output folder, determinism, seeds (prepare_run)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from utils.config import config_text, load_config, parse_override
from utils.device import resolve_device, seed_everything, use_deterministic_algorithms
from utils.distributed import barrier, get_rank, init_distributed_mode, is_main_process
from utils.errors import ConfigError, UserError
from utils.files import hold_config, prepare_output_dir, reset_pending_config
from utils.memory import tune_memory_allocator

_OFFLINE_VALUES = ('1', 'on', 'yes', 'true')
DEFAULT_TEXT_ENCODER = 'bert-base-uncased'  # what engine.build_tokenizer loads when the config names none


def _hub_cached(name: str) -> bool:
    """Whether the Hugging Face cache holds a tokenizer of hub repo `name` (vocab.txt or tokenizer.json)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in ('vocab.txt', 'tokenizer.json'))
    except Exception:  # an invalid repo id, an unreadable cache: not usable either way
        return False


def check_text_folder(name: str, where: str, tokenizer: bool = True) -> None:
    """Check a text_encoder / text_decoder value before anything is built: a local folder must exist (and, for the
    tokenizer, hold vocab.txt or tokenizer.json; transformers would otherwise build an empty vocabulary without a
    word); a hub name must be in the local cache when downloads are off (HF_HUB_OFFLINE). `where` names the flag or
    the flag or the config key (with the value) in the error."""
    if os.path.isdir(name):
        if tokenizer and not any(os.path.isfile(os.path.join(name, f)) for f in ('vocab.txt', 'tokenizer.json')):
            raise UserError(f'{where}: the folder holds no vocab.txt (nor tokenizer.json)')
        return
    if os.path.exists(name):
        raise UserError(f'{where}: not a folder (give the folder that holds vocab.txt, or a hub name)')
    # Hub names are 'name' or 'namespace/name'; anything else can only be meant as a folder.
    if (os.path.isabs(name) or name.startswith(('.', '~')) or name.endswith('/') or name.count('/') > 1
            or '\\' in name or not name.strip()):
        raise UserError(f'{where}: folder not found')
    offline = any(os.environ.get(v, '').lower() in _OFFLINE_VALUES for v in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))
    if tokenizer and offline and not _hub_cached(name):
        raise UserError(f'{where}: no such folder, and not in the Hugging Face cache (downloads are off: '
                        f'HF_HUB_OFFLINE)')


def prepare_run(args, required: Sequence[str] = (), evaluate: bool = False,
                minimums: Mapping[str, tuple[int, str]] | None = None) -> tuple[dict, torch.device]:
    """Everything a task script does before building data and model; writes nothing before its checks pass.

    Loads and validates the config (with --opt overrides and --text_encoder / --text_decoder / --precision /
    --num_workers), checks the task's `minimums` ({key: (least value, why)}) and the text encoder folders,
    starts torch.distributed when launched for it, checks and creates output_dir (prepare_output_dir), turns on
    deterministic algorithms with --deterministic, seeds with seed + rank and tunes malloc for large tensors
    (tune_memory_allocator). Returns (config, device).

    config.yaml is not written here: it is written just before the run's first output file (a checkpoint, log.txt,
    a result file), or at the end of a run that wrote none, so a run that fails on its data, checkpoint or model
    leaves the folder as it found it (and removes it again if it created it). A --resume run rewrites it once its
    checkpoint accepted the config (engine.resume_training).
    """
    reset_pending_config()
    overrides = dict(parse_override(o) for o in getattr(args, 'opt', []))
    config = load_config(args.config, required=required, overrides=overrides)
    for key in ('text_encoder', 'text_decoder'):
        if getattr(args, key, None):
            config[key] = getattr(args, key)
    if getattr(args, 'precision', None):
        config['precision'] = args.precision
    if getattr(args, 'compile', None):
        config['compile'] = True
    if getattr(args, 'num_workers', None) is not None:
        config['num_workers'] = args.num_workers
    if 'scheduler' in config:  # accept the correct spelling; the code reads the original's
        config['schedular'] = config.pop('scheduler')
    for key, (least, why) in (minimums or {}).items():
        if key in config and config[key] < least:
            raise ConfigError(f"{args.config}: key '{key}' must be >= {least} {why}, got {config[key]}")
    for key in ('text_encoder', 'text_decoder'):
        if key in config or key == 'text_encoder':
            name = config.get(key, DEFAULT_TEXT_ENCODER)
            where = (f'--{key} {name}' if getattr(args, key, None) else
                     f"{args.config}: key '{key}' ({name}{'' if key in config else ', the default'})")
            check_text_folder(name, where, tokenizer=key == 'text_encoder')
    init_distributed_mode(args)
    device = resolve_device(args.device)
    resume = getattr(args, 'resume', False)
    if is_main_process():
        text = config_text(config)
        created = prepare_output_dir(args.output_dir, resume, getattr(args, 'overwrite', False), evaluate,
                                     config_text=text, config_file=args.config)
        # A resumed run rewrites config.yaml only once its checkpoint accepted the config.
        hold_config(os.path.abspath(args.output_dir), created,
                    None if resume else os.path.join(args.output_dir, 'config.yaml'), text)
    barrier()
    if getattr(args, 'deterministic', False):
        use_deterministic_algorithms()
    seed_everything(args.seed + get_rank())
    tune_memory_allocator()
    return config, device
