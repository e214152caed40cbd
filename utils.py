"""Shared helpers: distributed setup, seeding, metric logging, config loading, CLI plumbing, safe file writes.

The names follow the ALBEF / DeiT / MAE lineage (`MetricLogger`, `SmoothedValue`, `init_distributed_mode`,
`is_main_process`, `get_rank`, `get_world_size`) so researchers find what they expect.
"""
from __future__ import annotations

import argparse
import builtins
import datetime
import difflib
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import defaultdict, deque
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------
# Errors meant for the user: one line, no traceback (unless --debug)
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flags). Printed as one line."""


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or does not match the schema."""


class AttrDict(dict):
    """A dict whose keys are also attributes (the optimizer / scheduler factories read them that way)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name, value):
        self[name] = value


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (all safe without a process group)
# ----------------------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """A barrier that is a no-op without a process group."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op at world size 1); returns it for chaining."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list:
    """Gather a picklable object from every rank, in rank order (a one-element list at world size 1)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on non-master ranks unless called with force=True."""
    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args) -> None:
    """Initialise torch.distributed from the environment, or fall back to a single process.

    Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, `torch.distributed.launch --use_env`), the `--local_rank`
    flag (legacy launch without --use_env), or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. `--no-distributed`
    forces a single process. Sets args.distributed, args.rank, args.world_size, args.gpu.
    """
    env = os.environ
    args.rank, args.world_size, args.gpu = 0, 1, 0
    if not getattr(args, 'distributed', True):
        args.distributed = False
        return
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', getattr(args, 'local_rank', 0) or 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
        env.setdefault('MASTER_ADDR', '127.0.0.1')
        env.setdefault('MASTER_PORT', '29500')
    else:
        args.distributed = False
        return
    if args.world_size == 1:
        args.distributed = False
        return
    args.distributed = True
    use_cuda = str(getattr(args, 'device', 'cpu')).startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = 'nccl' if use_cuda else 'gloo'
    timeout = datetime.timedelta(seconds=int(getattr(args, 'dist_timeout', 1800)))
    dist.init_process_group(backend=backend, init_method=getattr(args, 'dist_url', 'env://'),
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    print(f'| distributed init (rank {args.rank} of {args.world_size}, backend {backend})', flush=True)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def resolve_device(requested: str) -> torch.device:
    """The device to run on: `requested`, falling back to CPU (with a note) when CUDA is absent."""
    if requested.startswith('cuda') and not torch.cuda.is_available():
        print(f'note: --device {requested} requested but CUDA is not available; using cpu')
        return torch.device('cpu')
    return torch.device(requested)


def use_deterministic_algorithms() -> None:
    """Make torch pick deterministic kernels (an error for ops that have none) and stop cuDNN autotuning.

    On CPU with a fixed thread count training is already reproducible; this also covers the CUDA kernels that
    are not (scatter/index_add with atomics, cuBLAS workspaces), at some cost in speed.
    """
    # cuBLAS reads this when its first handle is created, i.e. later than here; a value set by the user wins.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


MALLOC_TUNING_ENV = 'ALBEF_MALLOC_TUNING'
_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's malloc.h


def tune_memory_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed memory for large tensors instead of mapping fresh pages each time.

    glibc serves every block above 32 MB (the most its mmap threshold can be raised to) with a new mmap and returns
    it on free, so every large temporary of a training step (vocabulary-sized gradients, the queue similarity
    inputs, big activations) is page-faulted in from zero each time: 15-20 ms for a 47 MB tensor on the reference
    CPU against under 2 ms for a reused one. With mmap off and up to `keep_bytes` of freed heap kept, a small-size
    bf16 pretraining step went from 1.40 s to 1.19 s at the same peak memory (benchmarks/train_step.py). The role
    jemalloc or tcmalloc play when preloaded, without a preload. Returns True when applied: only on Linux with glibc,
    and not when the environment sets ALBEF_MALLOC_TUNING=0.
    """
    if os.environ.get(MALLOC_TUNING_ENV, '1') == '0' or not sys.platform.startswith('linux'):
        return False
    import ctypes
    import platform
    if platform.libc_ver()[0] != 'glibc':
        return False
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    # Both settings are needed: with mmap off alone, glibc would still trim freed heap above 128 KB back to the OS.
    return bool(libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, keep_bytes)) and bool(libc.mallopt(_GLIBC_M_MMAP_MAX, 0))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (callers pass seed + rank, as the original does)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Metric logging
# ----------------------------------------------------------------------------------------------------------------
class SmoothedValue:
    """Track a series of values; windowed median/avg plus global average (synchronisable across ranks)."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local, as in the original)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == 'nccl':
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(np.median(list(self.deque))) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A set of named SmoothedValues with periodic progress lines (rate and ETA)."""

    def __init__(self, delimiter: str = '  ', window_size: int = 20):
        self.meters: dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr):
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def global_avg(self) -> str:
        return self.delimiter.join(f'{name}: {meter.global_avg:.4f}' for name, meter in self.meters.items())

    def averages(self) -> dict[str, float]:
        """Global averages of every meter as floats (for JSON logs)."""
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '', total: int | None = None):
        """Yield from `iterable`, printing progress (meters, s/it, data time, ETA) every `print_freq` items."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f'[{i:>{width}}/{total}]', f'eta: {eta}', str(self),
                         f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}')
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
              f'({total_time / max(i, 1):.4f} s / it)', flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Config loading and validation
# ----------------------------------------------------------------------------------------------------------------
_STR_OR_LIST = (str, list)
_NUM = (int, float)

# Every top-level key a config may hold, with its accepted types. Keys from the original ALBEF configs plus our
# additions (whose defaults, applied where they are read, reproduce the original).
CONFIG_SCHEMA: dict[str, tuple] = {
    # data
    'train_file': _STR_OR_LIST, 'val_file': _STR_OR_LIST, 'test_file': _STR_OR_LIST,
    'image_root': (str,), 'vqa_root': (str,), 'vg_root': (str,), 'answer_list': (str,),
    'refcoco_data': (str,), 'det_file': (str,), 'coco_file': (str,), 'eos': (str,),
    'max_words': (int,), 'augment': (dict,), 'skip_bad_images': (bool,), 'allow_absolute_paths': (bool,), 'num_workers': (int,),
    # model
    'bert_config': (str, dict), 'image_res': (int,), 'patch_size': (int,), 'vision_width': (int,),
    'vision_depth': (int,), 'vision_num_heads': (int,), 'mlp_ratio': _NUM, 'embed_dim': (int,),
    'vision_init_std': _NUM, 'attention_qk_init_std': _NUM, 'patch_embed': (str,),
    'temp': _NUM, 'learn_temp': (bool,), 'mlm_probability': _NUM, 'itm_random_negatives': _NUM,
    'queue_size': (int,), 'momentum': _NUM, 'alpha': _NUM,
    'distill': (bool,), 'vqa_decoder_layers': (int,), 'grad_checkpointing': (bool, list),
    'text_encoder': (str,), 'text_decoder': (str,), 'load_text_weights': (bool,), 'vision_pretrained': (str, type(None)),
    'freeze_vision': (bool,),
    # training / evaluation
    'batch_size': (int,), 'batch_size_train': (int,), 'batch_size_test': (int,), 'k_test': (int,),
    'warm_up': (bool,), 'eval_ema': (bool,), 'precision': (str,), 'grad_accum_steps': (int,),
    'print_freq': (int,), 'itm_batch_size': (int,), 'score': (str,), 'ddp_bucket_cap_mb': _NUM,
    'epoch_checkpoint_every': (int,),
    'optimizer': (dict,), 'schedular': (dict,), 'scheduler': (dict,),
}
OPTIMIZER_KEYS = {'opt', 'lr', 'weight_decay', 'momentum', 'opt_eps', 'opt_betas', 'opt_args',
                  'filter_bias_and_bn'}
SCHEDULER_KEYS = {'sched', 'lr', 'epochs', 'min_lr', 'decay_rate', 'warmup_lr', 'warmup_epochs',
                  'cooldown_epochs', 'decay_epochs', 'patience_epochs', 'eval_metric', 'lr_noise',
                  'lr_noise_pct', 'lr_noise_std', 'lr_cycle_mul', 'lr_cycle_limit', 'seed'}
POSITIVE_KEYS = {'image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads', 'embed_dim',
                     'queue_size', 'batch_size', 'batch_size_train', 'batch_size_test', 'k_test', 'max_words',
                     'vqa_decoder_layers', 'grad_accum_steps', 'print_freq', 'itm_batch_size', 'vision_init_std',
                     'attention_qk_init_std', 'ddp_bucket_cap_mb'}
NON_NEGATIVE_KEYS = {'epoch_checkpoint_every'}
UNIT_INTERVAL_KEYS = {'mlm_probability', 'momentum', 'alpha', 'itm_random_negatives'}  # shares and rates in [0, 1]
CHOICES = {'precision': ('fp32', 'bf16', 'fp16'), 'score': ('itm', 'itm+itc', 'itc'), 'patch_embed': ('linear', 'conv')}


def _type_names(types: tuple) -> str:
    return ' or '.join('null' if t is type(None) else t.__name__ for t in types)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _check_block(path: str, block_name: str, block: dict, known: set, required: Sequence[str]) -> None:
    for key in block:
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{block_name}.{key}'{_suggest(str(key), known)}")
    for key in required:
        if key not in block:
            raise ConfigError(f"{path}: missing required key '{block_name}.{key}'")


def _check_augment(path: str, block: Mapping) -> None:
    """Value checks of the `augment:` block (its keys are checked by _check_block)."""
    from dataset.randaugment import OPS
    from dataset.transforms import SWAP_SIDES
    scale = block.get('crop_min_scale', 0.5)
    if isinstance(scale, bool) or not isinstance(scale, _NUM) or not 0 < scale <= 1:
        raise ConfigError(f"{path}: key 'augment.crop_min_scale' must be a number in (0, 1], got {scale!r}")
    if not isinstance(block.get('hflip', True), bool) and block['hflip'] != SWAP_SIDES:
        raise ConfigError(f"{path}: key 'augment.hflip' must be true, false or '{SWAP_SIDES}', got {block['hflip']!r}")
    ops = block.get('randaug_ops', [])
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise ConfigError(f"{path}: key 'augment.randaug_ops' must be a list of op names, got {ops!r}")
    for op in ops:
        if op not in OPS:
            raise ConfigError(f"{path}: key 'augment.randaug_ops' names an unknown op '{op}'{_suggest(op, OPS)}; "
                              f"known ops: {', '.join(OPS)}")


def _first_non_finite(path: str, value, key: str = '', ancestors: tuple = ()) -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or infinite number anywhere in a config, or None.

    A list or mapping that contains itself (a recursive YAML alias) is a ConfigError: no config key takes one.
    """
    if isinstance(value, float) and not np.isfinite(value):
        return key, value
    if not isinstance(value, (Mapping, list)):
        return None
    if any(value is a for a in ancestors):
        raise ConfigError(f"{path}: key '{key}' contains itself (a recursive YAML alias)")
    children = value.items() if isinstance(value, Mapping) else enumerate(value)
    for k, v in children:
        found = _first_non_finite(path, v, f'{key}.{k}' if key else str(k), ancestors + (value,))
        if found is not None:
            return found
    return None


def validate_config(config: Mapping, path: str = '<config>', required: Sequence[str] = ()) -> None:
    """Check keys, types and value ranges; raise ConfigError naming the file and the key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f'{path}: top level must be a mapping of keys to values, got {type(config).__name__}')
    for key, value in config.items():
        if key not in CONFIG_SCHEMA:
            raise ConfigError(f"{path}: unknown key '{key}'{_suggest(str(key), CONFIG_SCHEMA)}")
        types = CONFIG_SCHEMA[key]
        # bool is an int subclass: 'image_res: true' must not pass as an int.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{path}: key '{key}' must be {_type_names(types)}, "
                              f"got {type(value).__name__} {value!r}")
        if key in POSITIVE_KEYS and value <= 0:
            raise ConfigError(f"{path}: key '{key}' must be > 0, got {value}")
        if key in NON_NEGATIVE_KEYS and value < 0:
            raise ConfigError(f"{path}: key '{key}' must be >= 0, got {value}")
        if key in UNIT_INTERVAL_KEYS and not 0 <= value <= 1:
            raise ConfigError(f"{path}: key '{key}' must be in [0, 1], got {value}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{path}: key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    for key in required:
        if key not in config:
            raise ConfigError(f"{path}: missing required key '{key}'")
    if 'optimizer' in config:
        _check_block(path, 'optimizer', config['optimizer'], OPTIMIZER_KEYS, ('opt', 'lr'))
    for name in ('schedular', 'scheduler'):
        if name in config:
            _check_block(path, name, config[name], SCHEDULER_KEYS, ('sched', 'epochs'))
    if 'schedular' in config and 'scheduler' in config:
        raise ConfigError(f"{path}: give either 'schedular' (original spelling) or 'scheduler', not both")
    if 'augment' in config:
        _check_block(path, 'augment', config['augment'], {'crop_min_scale', 'hflip', 'randaug_ops'}, ())
        _check_augment(path, config['augment'])
    bad_number = _first_non_finite(path, config)
    if bad_number is not None:
        raise ConfigError(f"{path}: key '{bad_number[0]}' must be a finite number, got {bad_number[1]}")
    if isinstance(config.get('grad_checkpointing'), list):
        bad = [x for x in config['grad_checkpointing'] if x not in ('vision', 'text')]
        if bad:
            raise ConfigError(f"{path}: key 'grad_checkpointing' entries must be 'vision' or 'text', got {bad}")
    if 'queue_size' in config:
        for bkey in ('batch_size', 'batch_size_train'):
            if bkey in config and config['queue_size'] < config[bkey]:
                raise ConfigError(f"{path}: key 'queue_size' ({config['queue_size']}) is smaller than "
                                  f"'{bkey}' ({config[bkey]}); the queue must hold at least one batch")


def _yaml():
    from ruamel.yaml import YAML
    yaml = YAML(typ='safe', pure=True)  # safe: no arbitrary Python objects; YAML 1.2 so 1e-4 is a float
    yaml.default_flow_style = False
    return yaml


def load_config(path: str, required: Sequence[str] = (), overrides: Mapping | None = None) -> dict:
    """Load a YAML config safely and validate it (unknown keys, types, ranges, `required` keys).

    `overrides` (e.g. from --opt key=value) are applied before validation. Errors name the file and key, and
    YAML syntax errors the line and column.
    """
    from ruamel.yaml import YAMLError
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            config = _yaml().load(f)
    except YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f':{mark.line + 1}:{mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        if 'could not determine a constructor' in problem:
            problem += ' (configs are read in YAML safe mode: plain values only, no Python objects)'
        raise ConfigError(f'{path}{where}: cannot parse YAML: {problem}') from None
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the config file ({e.strerror or e})') from None
    if config is None:
        raise ConfigError(f'{path}: the file is empty')
    if isinstance(config, dict) and overrides:
        config.update(overrides)
    validate_config(config, path, required)
    return dict(config)


def save_config(config: Mapping, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    buf = io.StringIO()
    _yaml().dump(json.loads(json.dumps(config)), buf)
    atomic_write_text(path, buf.getvalue())


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--opt key=value` override (value read as YAML, e.g. `batch_size=8`, `distill=false`)."""
    from ruamel.yaml import YAMLError
    if '=' not in text:
        raise ConfigError(f"--opt expects key=value, got '{text}'")
    key, raw = text.split('=', 1)
    try:
        return key.strip(), _yaml().load(raw)
    except YAMLError as e:
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f"--opt {text}: the value is not valid YAML ({problem})") from None


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
TMP_SUFFIX = '.tmp-partial'


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a partial one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def save_on_master(obj: Any, path: str) -> None:
    """Atomically save on the main process only."""
    if is_main_process():
        atomic_save(obj, path)


def remove_partial_files(directory: str) -> list[str]:
    """Delete temp files left by a write that was killed midway; returns their names."""
    if not os.path.isdir(directory):
        return []
    removed = [n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX)]
    for name in removed:
        os.remove(os.path.join(directory, name))
    return removed


def append_json_line(path: str, record: Mapping) -> None:
    """Append one JSON object as a line (log.txt), flushed to disk."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def get_parent_parser(default_config: str, default_output_dir: str) -> argparse.ArgumentParser:
    """The flags every task script shares, training-loop ones included (use as `parents=[...]`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--config', default=default_config, help='YAML config file')
    p.add_argument('--output_dir', default=default_output_dir)
    p.add_argument('--checkpoint', default='', help='checkpoint to start from (path or URL)')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --output_dir from its latest checkpoint (or --checkpoint)')
    p.add_argument('--overwrite', action='store_true', help='allow an output_dir that holds another run')
    # Read by engine.train, which every task script trains through.
    p.add_argument('--save_every_steps', default=0, type=int,
                   help='also write checkpoint_last.pth every N steps within an epoch (exact resume)')
    p.add_argument('--max_steps_per_epoch', default=0, type=int, help='cut epochs short (smoke tests)')
    p.add_argument('--text_encoder', default=None,
                   help='tokenizer and BERT weights: hub name or local folder (default: from config)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', default=42, type=int)
    p.add_argument('--deterministic', action='store_true',
                   help='use only deterministic torch kernels (bit-exact reruns and resumes; slower on GPU)')
    p.add_argument('--distributed', action=argparse.BooleanOptionalAction, default=True,
                   help='use torch.distributed when launched by torchrun (--no-distributed to force off)')
    p.add_argument('--world_size', default=1, type=int)
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--dist_timeout', default=1800, type=_positive_int, metavar='SECONDS',
                   help='how long a rank waits for the others (start-up and each collective) before it fails')
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help=argparse.SUPPRESS)
    p.add_argument('--precision', default=None, choices=['fp32', 'bf16', 'fp16'],
                   help='autocast precision (default: config, else fp32)')
    p.add_argument('--num_workers', default=None, type=int, help='data loader workers (default: config, else 4)')
    p.add_argument('--unsafe_load', action='store_true',
                   help='allow checkpoints that contain pickled code (only for files you trust)')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config key, e.g. --opt batch_size=8 (repeatable)')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


EXIT_USER_ERROR = 2    # bad config, data, checkpoint or flags: the one-line message says what to fix
EXIT_PEER_LOST = 3     # another rank of a distributed run failed or was killed; this rank stopped on its own
EXIT_INTERRUPTED = 130

# What torch.distributed backends say when the other end of a collective is gone (gloo raises plain RuntimeErrors
# from its transport, e.g. "Read error ...: Connection reset by peer"; other code paths raise DistError).
_LOST_PEER_PATTERN = re.compile(r'connection (reset|closed|refused)|closed by peer|broken pipe|socket|timed out|'
                                r'timeout|pair closure', re.IGNORECASE)


def _rank_prefix() -> str:
    """'rank R of W: ' in a distributed run (so the line says which process failed), else ''."""
    return f'rank {get_rank()} of {get_world_size()}: ' if get_world_size() > 1 else ''


def lost_peer_reason(exc: BaseException) -> str | None:
    """If `exc` means another rank of the process group is gone, a short reason from its message; else None."""
    if not isinstance(exc, RuntimeError):
        return None
    is_dist_error = isinstance(exc, dist.DistError)
    if not is_dist_error and not (is_dist_avail_and_initialized() and _LOST_PEER_PATTERN.search(str(exc))):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r'^\[[^\]]*\]\s*', '', first)  # gloo prefixes the C++ source location
    first = first.split(' This is typically caused')[0]
    return first[:200]


def _print_error(message: str) -> None:
    # One line whatever the message quotes (a key or a path with a newline in it), so that logs stay greppable.
    message = message.replace('\r', '\\r').replace('\n', '\\n')
    # Straight to stderr: on ranks > 0 `print` is silenced by setup_for_distributed, and their errors must show.
    sys.stderr.write(f'error: {_rank_prefix()}{message}\n')
    sys.stderr.flush()


def run_cli(main, argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and return the exit code; errors meant for the user become one line on stderr.

    UserError -> `error: <message>` and EXIT_USER_ERROR (2). Losing another rank of a distributed run (it crashed
    or was killed, so a collective fails here) -> one line and EXIT_PEER_LOST (3), instead of a traceback from
    deep inside the backend. In a distributed run the line starts with 'rank R of W: '. With --debug both are
    re-raised with their traceback. Anything else is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
        return 0
    except UserError as e:
        if '--debug' in argv:
            raise
        _print_error(str(e))
        return EXIT_USER_ERROR
    except RuntimeError as e:
        reason = lost_peer_reason(e)
        if reason is None or '--debug' in argv:
            raise
        _print_error(f'lost contact with the other processes ({reason}); another rank failed or was killed, '
                     f'see its output')
        return EXIT_PEER_LOST
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED


# ----------------------------------------------------------------------------------------------------------------
# Run set-up shared by the task scripts
# ----------------------------------------------------------------------------------------------------------------
RUN_MARKERS = ('log.txt', 'checkpoint_last.pth', 'checkpoint_best.pth')


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool, evaluate: bool = False) -> None:
    """Create `output_dir`, check it is writable, and refuse to mix a new run into another run's folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f'--output_dir {output_dir}: exists and is not a directory')
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {output_dir}: cannot create it ({e.strerror})') from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f'--output_dir {output_dir}: not writable')
    existing = [n for n in os.listdir(output_dir)
                if n in RUN_MARKERS or (n.startswith('checkpoint_') and n.endswith('.pth'))]
    if existing and not (resume or overwrite or evaluate):
        raise UserError(f'--output_dir {output_dir} already holds a run ({sorted(existing)[0]}, ...); '
                        f'pass --resume to continue it or --overwrite to start over there')
    removed = remove_partial_files(output_dir)
    if removed:
        print(f'removed {len(removed)} partial file(s) left by an interrupted write: {", ".join(removed)}')


def prepare_run(args, required: Sequence[str] = (), evaluate: bool = False) -> tuple[dict, torch.device]:
    """Everything a task script does before building data and model.

    Loads and validates the config (with --opt overrides and --text_encoder / --precision / --num_workers),
    starts torch.distributed when launched for it, prepares output_dir, writes config.yaml (a --resume run: after
    the checkpoint's check, see engine.resume_training), turns on deterministic algorithms with --deterministic,
    seeds with seed + rank and tunes malloc for large tensors (tune_memory_allocator). Returns (config, device).
    """
    overrides = dict(parse_override(o) for o in getattr(args, 'opt', []))
    config = load_config(args.config, required=required, overrides=overrides)
    if getattr(args, 'text_encoder', None):
        config['text_encoder'] = args.text_encoder
    if getattr(args, 'precision', None):
        config['precision'] = args.precision
    if getattr(args, 'num_workers', None) is not None:
        config['num_workers'] = args.num_workers
    if 'scheduler' in config:  # accept the correct spelling; the code reads the original's
        config['schedular'] = config.pop('scheduler')
    init_distributed_mode(args)
    device = resolve_device(args.device)
    resume = getattr(args, 'resume', False)
    if is_main_process():
        prepare_output_dir(args.output_dir, resume, getattr(args, 'overwrite', False), evaluate)
        if not resume:  # a resumed run rewrites config.yaml only once its checkpoint accepted the config
            save_config(config, os.path.join(args.output_dir, 'config.yaml'))
    barrier()
    if getattr(args, 'deterministic', False):
        use_deterministic_algorithms()
    seed_everything(args.seed + get_rank())
    tune_memory_allocator()
    return config, device
