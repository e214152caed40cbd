"""Shared helpers: distributed setup, seeding, metric logging, config loading, CLI plumbing, safe file writes.

The names follow the ALBEF / DeiT / MAE lineage (`MetricLogger`, `SmoothedValue`, `init_distributed_mode`,
`is_main_process`, `get_rank`, `get_world_size`) so researchers find what they expect.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import datetime
import difflib
import io
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------
# Errors meant for the user: one line, no traceback (unless --debug)
# ----------------------------------------------------------------------------------------------------------------
# How torch.utils.data re-raises an exception of a worker in the main process (torch._utils.ExceptionWrapper).
_WORKER_HEADER = re.compile(r'Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback')


def worker_error_message(message: str, exc_type: type) -> str | None:
    """The original message of an exception that torch re-raised from a DataLoader worker, or None.

    torch re-creates the worker's exception as `exc_type(text)` where text is a header plus the formatted
    traceback, whose last line is '<module>.<Class>: <original message>'.
    """
    if not isinstance(message, str) or not _WORKER_HEADER.match(message):
        return None
    module, name = exc_type.__module__, exc_type.__qualname__
    marker = (name if module in ('builtins', '__main__') else f'{module}.{name}') + ': '
    k = message.rfind('\n' + marker)
    if k < 0:
        return None
    return message[k + 1 + len(marker):].rstrip('\n')


def unwrap_worker_error(exc: BaseException) -> BaseException | None:
    """For a UserError re-raised by torch from a DataLoader worker: the same error type with the original one-line
    message (the worker's traceback dropped); None for anything else."""
    if not isinstance(exc, UserError) or not exc.args or not isinstance(exc.args[0], str):
        return None
    original = worker_error_message(exc.args[0], type(exc))
    if original is None:
        return None
    try:
        return type(exc)(original)
    except Exception:  # noqa: BLE001 - a subclass with another constructor: keep the message, lose the type
        return UserError(original)


class UserError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flags). Printed as one line.

    Raised inside a DataLoader worker, the error reaches the main process re-created by torch with the worker's
    whole traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    the constructor recognises that form and keeps only the original one-line message.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            original = worker_error_message(args[0], type(self))
            if original is not None:
                args = (original,)
        super().__init__(*args)


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
_NUM = (int, float)
_NONE = type(None)
_MEMORY = 'larger would not fit in memory'


class Spec(tuple):
    """What a config key accepts: its types (the tuple itself, so `isinstance(value, spec)` works and iterating it
    gives the types) and, for numbers, their range, declared once beside the type.

    `lo` / `hi` bound the meaningful values (`lo_open` / `hi_open`: the bound itself is excluded); `cap` is a
    sanity limit on a size (`why` says what goes wrong above it); `items` is the Spec of a list's entries and
    `choices` the accepted values.
    """

    def __new__(cls, types, lo=None, hi=None, *, lo_open=False, hi_open=False, cap=None, why=_MEMORY, items=None,
                choices=None):
        self = super().__new__(cls, types if isinstance(types, tuple) else (types,))
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.cap, self.why, self.items, self.choices = cap, why, items, choices
        return self

    def range_text(self) -> str:
        """'> 0', '>= 0', 'in [0, 1]', 'in [0, 1)' ... ('' when unbounded)."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return ''

    def problem(self, value) -> str | None:
        """What is wrong with `value` ('must be ..., got ...'), or None when it fits."""
        # bool is an int subclass: 'image_res: true' must not pass as an int.
        if not isinstance(value, self) or (isinstance(value, bool) and bool not in self and int in self):
            return f'must be {_type_names(self)}, got {type(value).__name__} {value!r}'
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if isinstance(value, _NUM) and not isinstance(value, bool):
            if isinstance(value, float) and not np.isfinite(value):
                return f'must be a finite number, got {value}'
            low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if low or high:
                return f'must be {self.range_text()}, got {value}'
            if self.cap is not None and value > self.cap:
                return f'must be <= {self.cap} ({self.why}), got {value}'
        if isinstance(value, list) and self.items is not None:
            for i, item in enumerate(value):
                found = self.items.problem(item)
                if found is not None:
                    return f'entry {i} {found}'
        return None


def _size(cap, why=_MEMORY) -> Spec:
    """An integer size: > 0 and at most `cap`."""
    return Spec((int,), 0, lo_open=True, cap=cap, why=why)


_FILES = Spec((str, list), items=Spec((str,)))
_SHARE = Spec(_NUM, 0, 1)                         # shares and rates in [0, 1]
_RATE = Spec(_NUM + (_NONE,), 0)                  # learning rates, weight decay: >= 0 (null: the default)

# Every top-level key a config may hold, with its accepted types and range. Keys from the original ALBEF configs
# plus our additions (whose defaults, applied where they are read, reproduce the original). The caps on sizes are
# far above any real model (ViT-g is 1408 wide, the original queue holds 65536) and far below what would make the
# run die in an allocation minutes later.
CONFIG_SCHEMA: dict[str, Spec] = {
    # data
    'train_file': _FILES, 'val_file': _FILES, 'test_file': _FILES,
    'image_root': Spec((str,)), 'vqa_root': Spec((str,)), 'vg_root': Spec((str,)), 'answer_list': Spec((str,)),
    'refcoco_data': Spec((str,)), 'det_file': Spec((str,)), 'coco_file': Spec((str,)), 'eos': Spec((str,)),
    'max_words': _size(65536), 'augment': Spec((dict,)), 'skip_bad_images': Spec((bool,)),
    'allow_absolute_paths': Spec((bool,)),
    'num_workers': Spec((int,), 0, cap=256, why='each worker is a process holding a copy of the dataset'),
    # model
    'bert_config': Spec((str, dict)), 'image_res': _size(4096), 'patch_size': _size(1024),
    'vision_width': _size(16384), 'vision_depth': _size(256), 'vision_num_heads': _size(1024),
    'mlp_ratio': Spec(_NUM, 0, lo_open=True, cap=64), 'embed_dim': _size(16384),
    'vision_init_std': Spec(_NUM, 0, lo_open=True), 'attention_qk_init_std': Spec(_NUM, 0, lo_open=True),
    'patch_embed': Spec((str,), choices=('linear', 'conv')),
    'temp': Spec(_NUM, 0, 1, lo_open=True), 'learn_temp': Spec((bool,)), 'mlm_probability': _SHARE,
    'itm_random_negatives': _SHARE, 'queue_size': _size(1 << 20), 'momentum': _SHARE, 'alpha': _SHARE,
    'distill': Spec((bool,)), 'vqa_decoder_layers': _size(256), 'grad_checkpointing': Spec((bool, list)),
    'text_encoder': Spec((str,)), 'text_decoder': Spec((str,)), 'load_text_weights': Spec((bool,)),
    'vision_pretrained': Spec((str, _NONE)), 'freeze_vision': Spec((bool,)),
    # training / evaluation
    'batch_size': _size(65536), 'batch_size_train': _size(65536), 'batch_size_test': _size(65536),
    'k_test': _size(65536), 'warm_up': Spec((bool,)), 'eval_ema': Spec((bool,)),
    'precision': Spec((str,), choices=('fp32', 'bf16', 'fp16')), 'grad_accum_steps': _size(65536),
    'print_freq': Spec((int,), 0, lo_open=True), 'itm_batch_size': _size(1 << 20),
    'score': Spec((str,), choices=('itm', 'itm+itc', 'itc')),
    'ddp_bucket_cap_mb': Spec(_NUM, 0, lo_open=True, cap=65536), 'epoch_checkpoint_every': Spec((int,), 0),
    'optimizer': Spec((dict,)), 'schedular': Spec((dict,)), 'scheduler': Spec((dict,)),
    'zero': Spec((bool,)), 'compile': Spec((bool,)),
}
# The blocks' keys (the optimizer's and scheduler's arguments; their factories apply the defaults).
OPTIMIZER_SCHEMA: dict[str, Spec] = {
    'opt': Spec((str,)), 'lr': _RATE, 'weight_decay': _RATE, 'momentum': Spec(_NUM + (_NONE,), 0, 1),
    'opt_eps': Spec(_NUM + (_NONE,), 0), 'opt_betas': Spec((list,), items=Spec(_NUM, 0, 1, hi_open=True)),
    'opt_args': Spec((dict, _NONE)), 'filter_bias_and_bn': Spec((bool,)),
}
SCHEDULER_SCHEMA: dict[str, Spec] = {
    'sched': Spec((str,)), 'lr': _RATE, 'epochs': Spec(_NUM, 0, lo_open=True), 'min_lr': _RATE,
    'decay_rate': Spec(_NUM, 0), 'warmup_lr': _RATE, 'warmup_epochs': Spec(_NUM, 0), 'cooldown_epochs': Spec(_NUM, 0),
    'decay_epochs': Spec(_NUM, 0, lo_open=True), 'patience_epochs': Spec((int,), 0), 'eval_metric': Spec((str,)),
    'lr_noise': Spec(_NUM + (list, _NONE), 0, items=Spec(_NUM, 0)), 'lr_noise_pct': Spec(_NUM, 0),
    'lr_noise_std': Spec(_NUM, 0), 'lr_cycle_mul': Spec(_NUM, 0, lo_open=True),
    'lr_cycle_limit': Spec((int,), 1), 'seed': Spec((int,)),
}
# The BERT config (`bert_config`: inline, or a JSON file): only the keys ALBEF builds from are checked; others
# (architectures, model_type, ...) pass through to transformers' BertConfig.
BERT_SCHEMA: dict[str, Spec] = {
    'hidden_size': _size(16384), 'num_attention_heads': _size(1024), 'num_hidden_layers': _size(256),
    'intermediate_size': _size(65536), 'vocab_size': _size(1 << 21), 'max_position_embeddings': _size(65536),
    'type_vocab_size': _size(1024), 'encoder_width': _size(16384), 'fusion_layer': Spec((int,), 0),
    'hidden_dropout_prob': _SHARE, 'attention_probs_dropout_prob': _SHARE,
    'layer_norm_eps': Spec(_NUM, 0, lo_open=True), 'initializer_range': Spec(_NUM, 0),
}
OPTIMIZER_KEYS = set(OPTIMIZER_SCHEMA)
SCHEDULER_KEYS = set(SCHEDULER_SCHEMA)
# Defaults the models apply when a key is absent (models/vit.py, models/common.py, BertConfig), for the checks
# that relate keys to each other.
MODEL_DEFAULTS = {'patch_size': 16, 'vision_width': 768, 'vision_num_heads': 12, 'embed_dim': 256,
                  'queue_size': 65536}
BERT_DEFAULTS = {'hidden_size': 768, 'num_attention_heads': 12, 'num_hidden_layers': 12}
MAX_QUEUE_FLOATS = 1 << 28  # queue_size * embed_dim: 1 GiB per fp32 queue (the original's is 64 MiB)

# Bounds on the work of reading a config, which may come from anywhere: a few KB of YAML whose aliases repeat each
# other ("billion laughs") would otherwise expand to billions of values. Real configs hold a few hundred values.
MAX_CONFIG_BYTES = 4 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32


def _type_names(types: tuple) -> str:
    return ' or '.join('null' if t is type(None) else t.__name__ for t in types)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _check_block(path: str, block_name: str, block: dict, schema: Mapping[str, Spec], required: Sequence[str]) -> None:
    for key in block:
        if key not in schema:
            raise ConfigError(f"{path}: unknown key '{block_name}.{key}'{_suggest(str(key), schema)}")
    for key in required:
        if key not in block:
            raise ConfigError(f"{path}: missing required key '{block_name}.{key}'")
    for key, value in block.items():
        found = schema[key].problem(value)
        if found is not None:
            raise ConfigError(f"{path}: key '{block_name}.{key}' {found}")


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


def _walk(path: str, config) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every value in a config, depth first in file order; bounded work.

    A list or mapping that contains itself (a recursive YAML alias), more than MAX_CONFIG_VALUES values in all or
    more than MAX_CONFIG_DEPTH levels of nesting are ConfigErrors (no config needs them; walking them would not end
    or take minutes).
    """
    stack: list = [('', config, ())]
    count = 0
    while stack:
        key, value, ancestors = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f'{path}: the config holds more than {MAX_CONFIG_VALUES} values (YAML aliases that '
                              f'repeat each other?); a config needs a few hundred')
        if isinstance(value, (Mapping, list)):
            if any(value is a for a in ancestors):
                raise ConfigError(f"{path}: key '{key}' contains itself (a recursive YAML alias)")
            if len(ancestors) >= MAX_CONFIG_DEPTH:
                raise ConfigError(f"{path}: key '{key}' is nested more than {MAX_CONFIG_DEPTH} levels deep")
            if len(value) > MAX_CONFIG_VALUES:
                raise ConfigError(f"{path}: key '{key}' holds {len(value)} values, more than the "
                                  f'{MAX_CONFIG_VALUES} a config may hold')
            children = list(value.items() if isinstance(value, Mapping) else enumerate(value))
            for k, v in reversed(children):
                stack.append((f'{key}.{k}' if key else str(k), v, ancestors + (value,)))
        yield key, value


def _read_limited(path: str, what: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, a device or a directory is refused without
    blocking on it (opened non-blocking, checked with fstat). `what` names the file in the errors."""
    import stat
    flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_NOCTTY', 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f'{what} not found: {path}') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the {what} ({e.strerror or e})') from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ('a directory' if stat.S_ISDIR(mode) else 'a FIFO (named pipe)' if stat.S_ISFIFO(mode) else
                    'a character device' if stat.S_ISCHR(mode) else 'a block device' if stat.S_ISBLK(mode) else
                    'a socket' if stat.S_ISSOCK(mode) else 'not a regular file')
            raise ConfigError(f'{path}: the {what} is {kind}, not a regular file')
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b''.join(chunks)
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the {what} ({e.strerror or e})') from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f'{path}: the {what} is larger than {limit >> 20} MiB; a config is a few KB')
    return data


def _load_bert_json(path: str, bert_path: str) -> Mapping | None:
    """The BERT config JSON named by `bert_config`, for its checks; None when it is not there (the model build
    reports a missing file)."""
    if not os.path.exists(bert_path):
        return None
    try:
        data = _read_limited(bert_path, 'bert_config file')
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


def validate_config(config: Mapping, path: str = '<config>', required: Sequence[str] = ()) -> None:
    """Check keys, types and value ranges (CONFIG_SCHEMA and the blocks' schemas), and the relations between keys;
    raise ConfigError naming the file and the key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f'{path}: top level must be a mapping of keys to values, got {type(config).__name__}')
    values = list(_walk(path, config))  # bounded: refuses recursive, huge or too deeply nested configs first
    for key, value in config.items():
        if key not in CONFIG_SCHEMA:
            raise ConfigError(f"{path}: unknown key '{key}'{_suggest(str(key), CONFIG_SCHEMA)}")
        found = CONFIG_SCHEMA[key].problem(value)
        if found is not None:
            raise ConfigError(f"{path}: key '{key}' {found}")
    for key in required:
        if key not in config:
            raise ConfigError(f"{path}: missing required key '{key}'")
    if 'optimizer' in config:
        _check_block(path, 'optimizer', config['optimizer'], OPTIMIZER_SCHEMA, ('opt', 'lr'))
    for name in ('schedular', 'scheduler'):
        if name in config:
            _check_block(path, name, config[name], SCHEDULER_SCHEMA, ('sched', 'epochs'))
    if 'schedular' in config and 'scheduler' in config:
        raise ConfigError(f"{path}: give either 'schedular' (original spelling) or 'scheduler', not both")
    if 'augment' in config:
        _check_block(path, 'augment', config['augment'], dict.fromkeys(('crop_min_scale', 'hflip', 'randaug_ops'),
                                                                       Spec((object,))), ())
        _check_augment(path, config['augment'])
    for key, value in values:
        if isinstance(value, float) and not np.isfinite(value):
            raise ConfigError(f"{path}: key '{key}' must be a finite number, got {value}")
    if isinstance(config.get('grad_checkpointing'), list):
        bad = [x for x in config['grad_checkpointing'] if x not in ('vision', 'text')]
        if bad:
            raise ConfigError(f"{path}: key 'grad_checkpointing' entries must be 'vision' or 'text', got {bad}")
    _check_relations(path, config)


def _yaml():
    from ruamel.yaml import YAML
    yaml = YAML(typ='safe', pure=True)  # safe: no arbitrary Python objects; YAML 1.2 so 1e-4 is a float
    yaml.default_flow_style = False
    return yaml


def _check_yaml_size(text: str, where: str) -> None:
    """Refuse YAML whose aliases expand to more than MAX_CONFIG_VALUES values or that nests deeper than
    MAX_CONFIG_DEPTH, from its event stream (before anything is built, so it costs the file's length, not its
    expansion). Syntax errors surface as the parser's YAMLError."""
    from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent
    sizes: dict = {}          # anchor -> number of values its node expands to
    open_nodes: list = [[None, 0]]  # [anchor, values so far] of every collection being read, outermost first
    for event in _yaml().parse(text):
        if isinstance(event, CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) - 1 > MAX_CONFIG_DEPTH:
                mark = event.start_mark
                raise ConfigError(f'{where}:{mark.line + 1}:{mark.column + 1}: nested more than {MAX_CONFIG_DEPTH} '
                                  f'levels deep')
            continue
        if isinstance(event, CollectionEndEvent):
            anchor, n = open_nodes.pop()
        elif isinstance(event, ScalarEvent):
            anchor, n = event.anchor, 1
        elif isinstance(event, AliasEvent):
            anchor, n = None, sizes.get(event.anchor, 1)  # unknown or still open: the loader reports it
        else:
            continue
        if anchor is not None:
            sizes[anchor] = n
        open_nodes[-1][1] += n
        if sum(count for _, count in open_nodes) > MAX_CONFIG_VALUES:
            mark = event.start_mark
            raise ConfigError(f'{where}:{mark.line + 1}:{mark.column + 1}: YAML aliases expand this to more than '
                              f'{MAX_CONFIG_VALUES} values (a "billion laughs" file?); a config needs a few hundred')


def _load_yaml(text: str, where: str, syntax_error=None):
    """Safe-load YAML text with bounded work (_check_yaml_size). A YAML error becomes a one-line ConfigError:
    `syntax_error(at, problem)` (default '<where>:<line>:<column>: cannot parse YAML: <problem>')."""
    from ruamel.yaml import YAMLError
    try:
        _check_yaml_size(text, where)
        return _yaml().load(text)
    except (YAMLError, RecursionError) as e:
        mark = getattr(e, 'problem_mark', None)
        at = f':{mark.line + 1}:{mark.column + 1}' if mark is not None else ''
        problem = (getattr(e, 'problem', None) or str(e).splitlines()[0] if isinstance(e, YAMLError)
                   else 'nested too deeply')
        if 'could not determine a constructor' in problem:
            problem += ' (configs are read in YAML safe mode: plain values only, no Python objects)'
        message = syntax_error(at, problem) if syntax_error else f'{where}{at}: cannot parse YAML: {problem}'
        raise ConfigError(message) from None


def load_config(path: str, required: Sequence[str] = (), overrides: Mapping | None = None) -> dict:
    """Load a YAML config safely and validate it (unknown keys, types, ranges, `required` keys).

    `overrides` (e.g. from --opt key=value) are applied before validation. Errors name the file and key, and
    YAML syntax errors the line and column. The work is bounded: only a regular file of at most MAX_CONFIG_BYTES
    is read (a FIFO or a device is refused, not waited on), and aliases may not expand it beyond
    MAX_CONFIG_VALUES values nor nesting go deeper than MAX_CONFIG_DEPTH levels.
    """
    data = _read_limited(path, 'config file')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})') from None
    config = _load_yaml(text, path)
    if config is None:
        raise ConfigError(f'{path}: the file is empty')
    if isinstance(config, dict) and overrides:
        config.update(overrides)
    validate_config(config, path, required)
    return dict(config)


def config_text(config: Mapping) -> str:
    """The YAML that save_config writes for `config`."""
    buf = io.StringIO()
    _yaml().dump(json.loads(json.dumps(config)), buf)
    return buf.getvalue()


def save_config(config: Mapping, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, config_text(config))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--opt key=value` override (value read as YAML, e.g. `batch_size=8`, `distill=false`)."""
    if '=' not in text:
        raise ConfigError(f"--opt expects key=value, got '{text}'")
    key, raw = text.split('=', 1)
    shown = text if len(text) <= 80 else text[:77] + '...'
    return key.strip(), _load_yaml(raw, f'--opt {shown}',
                                   lambda at, problem: f'--opt {text}: the value is not valid YAML ({problem})')


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
TMP_SUFFIX = '.tmp-partial'


# A run's config.yaml waits here until the run writes its first output into its folder (see prepare_run): a run
# that fails on its inputs (data files, checkpoint, model) then leaves the folder as it found it.
_pending_config: dict = {}


def _write_pending_config(target: str | None = None) -> None:
    """Write the pending config.yaml when `target` (a file about to be written) lies in the run's output folder,
    or unconditionally when `target` is None (the run ended well)."""
    if not _pending_config:
        return
    if target is not None and not os.path.abspath(target).startswith(_pending_config['folder'] + os.sep):
        return
    pending = dict(_pending_config)
    _pending_config.clear()  # first: the write below comes back through here
    if 'text' in pending:  # (a --resume run has none: engine.resume_training writes it)
        atomic_write_text(pending['path'], pending['text'])


def _drop_pending_config() -> None:
    """Forget an unwritten config.yaml (the run failed before any output) and remove the output folder, and the
    parents created with it, if the run created them and they are still empty."""
    pending = dict(_pending_config)
    _pending_config.clear()
    created = pending.get('created')
    if not created:
        return
    folder = pending['folder']
    while True:
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            return
        if folder == created or len(folder) <= len(created):
            return
        folder = os.path.dirname(folder)


_DISK_REASONS = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded',
                 errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                 errno.EPERM: 'operation not permitted', errno.EFBIG: 'file too large', errno.EIO: 'input/output error'}


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError that caused `exc` (itself, or along its __cause__ / __context__ chain), or None.

    torch.save turns a failed write into a RuntimeError ('unexpected pos ...') raised while the OSError that
    caused it is being handled."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """'no space left on the device (ENOSPC)' and the like."""
    code = errno.errorcode.get(e.errno, str(e.errno))
    return f'{_DISK_REASONS.get(e.errno) or (e.strerror or str(e)).lower()} ({code})'


class WriteError(UserError):
    """A file could not be written (disk full, quota, read-only, permissions); its __cause__ is the OSError."""


def _write_error(path: str, exc: BaseException) -> BaseException:
    """`exc` as a one-line WriteError naming `path` when an OSError caused it, else `exc` itself."""
    e = os_error_in(exc)
    if e is None or isinstance(exc, UserError):
        return exc
    err = WriteError(f'cannot write {path}: {describe_os_error(e)}')
    err.__cause__ = e
    return err


def _atomic_write(path: str, write) -> None:
    _write_pending_config(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix=TMP_SUFFIX, dir=directory)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a partial one
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        err = _write_error(path, exc)
        if err is exc:
            raise
        raise err from err.__cause__


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
    """Append one JSON object as a line (log.txt), flushed to disk, all or nothing: a failed write (disk full) is
    cut back off the file, so that it keeps only whole lines, and raises a one-line WriteError naming it."""
    _write_pending_config(path)
    data = (json.dumps(record) + '\n').encode('utf-8')
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise _write_error(path, e) from e
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def _int_flag(spec: Spec):
    """argparse type: an integer that `spec` (a Spec, e.g. CONFIG_SCHEMA's entry of the key the flag sets) accepts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got '{text}'") from None
        found = spec.problem(value)
        if found is not None:
            raise argparse.ArgumentTypeError(found)
        return value
    parse.__name__ = 'int'
    return parse


def config_flag(key: str):
    """argparse type of a flag that sets config key `key`: checked against the key's range in CONFIG_SCHEMA."""
    return _int_flag(CONFIG_SCHEMA[key])


SEED_RANGE = Spec((int,), 0, 2 ** 32 - 1)  # numpy's seed range; torch and the samplers add rank and epoch to it
STEP_COUNT = Spec((int,), 0)


def device_flag(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, where N names a CUDA device of this machine. Without CUDA
    a cuda device falls back to cpu (resolve_device), as the default does."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f"'{text}': only cpu and cuda devices are supported")
    if device.type == 'cuda' and device.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if device.index >= count:
            raise argparse.ArgumentTypeError(f"'{text}': this machine has {count} CUDA device(s) "
                                             f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    return text


def input_file(text: str) -> str:
    """argparse type: an existing regular file (not a folder, a FIFO or a device)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f'file not found: {text}')
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f'{text} is not a regular file')
    return text


def get_parent_parser(default_config: str, default_output_dir: str) -> argparse.ArgumentParser:
    """The flags every task script shares, training-loop ones included (use as `parents=[...]`). Numeric flags are
    range-checked as they are parsed; a flag that sets a config key uses that key's range (CONFIG_SCHEMA)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--config', default=default_config, help='YAML config file')
    p.add_argument('--output_dir', default=default_output_dir)
    p.add_argument('--checkpoint', default='', help='checkpoint to start from (path or URL)')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --output_dir from its latest checkpoint (or --checkpoint)')
    p.add_argument('--overwrite', action='store_true',
                   help='allow an output_dir that holds another run, or files this run would replace')
    # Read by engine.train, which every task script trains through.
    p.add_argument('--save_every_steps', default=0, type=_int_flag(STEP_COUNT),
                   help='also write checkpoint_last.pth every N steps within an epoch (exact resume; 0: off)')
    p.add_argument('--max_steps_per_epoch', default=0, type=_int_flag(STEP_COUNT),
                   help='cut epochs short (smoke tests; 0: whole epochs)')
    p.add_argument('--text_encoder', default=None,
                   help='tokenizer and BERT weights: hub name or local folder (default: from config)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=device_flag,
                   help='cpu, cuda or cuda:N')
    p.add_argument('--seed', default=42, type=_int_flag(SEED_RANGE))
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
    p.add_argument('--compile', action='store_true', default=None,
                   help='torch.compile the encoders for training (config key compile; default: config, else off)')
    p.add_argument('--num_workers', default=None, type=config_flag('num_workers'),
                   help='data loader workers (default: config, else 4)')
    p.add_argument('--unsafe_load', action='store_true',
                   help='allow checkpoints that contain pickled code (only for files you trust)')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config key, e.g. --opt batch_size=8 (repeatable)')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


class UsageError(SystemExit):
    """A command-line error found by argparse, already printed as one line (see one_line_errors)."""


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` report a command-line error (unknown flag, bad value) like every other user error: one line
    `error: <message>` on stderr and exit status 2, instead of argparse's usage block. Returns the parser."""
    def error(message: str):
        _print_error(f'{message} (see --help)')
        raise UsageError(EXIT_USER_ERROR)
    parser.error = error
    return parser


EXIT_USER_ERROR = 2    # bad config, data, checkpoint or flags: the one-line message says what to fix
EXIT_PEER_LOST = 3     # another rank of a distributed run failed or was killed; this rank stopped on its own
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's status for a process ended by SIGTERM

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
    previous_sigterm = _install_sigterm_fallback()
    try:
        main(argv)
        _write_pending_config()  # a run that wrote nothing into its folder still gets its config.yaml
        return 0
    except UsageError:  # argparse's, already printed as one line
        return EXIT_USER_ERROR
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
    finally:
        _drop_pending_config()  # a run that failed before writing anything leaves its folder as it found it
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _on_sigterm_outside_training(signum, frame) -> None:
    # Training installs its own handler (engine.RunGuard), which says what was kept; this one covers start-up,
    # --evaluate runs and the evaluation after training, where nothing is being written that could be lost.
    _print_error('stopped by SIGTERM (no training step was running; files written before are kept)')
    raise SystemExit(EXIT_TERMINATED)


def _install_sigterm_fallback():
    """Make SIGTERM end a script with one line instead of silently; returns the handler it replaced (None when
    not in the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm_outside_training)


# ----------------------------------------------------------------------------------------------------------------
# Run set-up shared by the task scripts
# ----------------------------------------------------------------------------------------------------------------
RUN_MARKERS = ('log.txt', 'checkpoint_last.pth', 'checkpoint_best.pth')
# What else the task scripts write into their folder (besides checkpoint_XX.pth): a folder that holds one of these
# but no run was not written by a run, and a new run must not replace them without --overwrite.
RUN_OUTPUTS = ('config.yaml', 'results.json', 'retrieval_test_metrics.json', 'grounding_results.json',
               'vqa_accuracy.json', 'result')


def _holds_text(path: str, text: str) -> bool:
    """Whether the regular file `path` holds exactly `text` (read without blocking on a FIFO or device)."""
    data = text.encode('utf-8')
    try:
        return _read_limited(path, 'file', limit=len(data)) == data
    except ConfigError:
        return False


def _foreign_outputs(output_dir: str, names: Sequence[str], config_text: str | None,
                     config_file: str | None) -> list[str]:
    """The files in a folder without a run that this run would replace: RUN_OUTPUTS, but not a config.yaml that
    already holds exactly the config this run would write (left by a start that was killed), nor an empty
    result/ folder. Refuses at once a --config file that is the folder's own config.yaml."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if name not in names or (name == 'result' and os.path.isdir(path) and not os.listdir(path)):
            continue
        if name == 'config.yaml':
            if config_text is not None and _holds_text(path, config_text):
                continue
            if config_file and os.path.exists(config_file) and os.path.samefile(config_file, path):
                raise UserError(f'--config {config_file} is the config.yaml of --output_dir {output_dir}, which the '
                                f'run writes its resolved config to; keep the config outside the output folder, '
                                f'or pass --overwrite to let the run replace it')
        found.append(name + ('/' if os.path.isdir(path) else ''))
    return found


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool, evaluate: bool = False, *,
                       config_text: str | None = None, config_file: str | None = None) -> str | None:
    """Check `output_dir` before anything is written, then create it and check it is writable.

    Refused without --overwrite: a folder that holds another run (log.txt or checkpoints), unless `resume`
    continues it (an `evaluate` run never adds to a training run's folder); and in a folder without a run, any file
    the run would replace (RUN_OUTPUTS: a user's config.yaml, the --config file itself, result files), except a
    config.yaml holding exactly `config_text`. Removes partial files left by a killed write. Returns the topmost
    folder it created (output_dir or a parent of it), or None.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f'--output_dir {output_dir}: exists and is not a directory')
    names: list[str] = []
    if os.path.isdir(output_dir):
        try:
            names = os.listdir(output_dir)
        except OSError as e:
            raise UserError(f'--output_dir {output_dir}: cannot list it ({e.strerror})') from None
    run = sorted(n for n in names if n in RUN_MARKERS or (n.startswith('checkpoint_') and n.endswith('.pth')))
    if run and not overwrite:
        if evaluate:
            raise UserError(f'--output_dir {output_dir} already holds a run ({run[0]}, ...); --evaluate would add '
                            f'to its log.txt and replace its config.yaml and result files: evaluate into another '
                            f'folder, or pass --overwrite')
        if not resume:
            raise UserError(f'--output_dir {output_dir} already holds a run ({run[0]}, ...); '
                            f'pass --resume to continue it or --overwrite to start over there')
    if not run and not overwrite:
        foreign = _foreign_outputs(output_dir, names, config_text, config_file)
        if foreign:
            raise UserError(f'--output_dir {output_dir} holds {", ".join(foreign)}, not written by a run, that this '
                            f'run would replace; choose another folder, or pass --overwrite to replace '
                            f'{"it" if len(foreign) == 1 else "them"}')
    created, parent = None, os.path.abspath(output_dir)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {output_dir}: cannot create it ({e.strerror})') from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f'--output_dir {output_dir}: not writable')
    removed = remove_partial_files(output_dir)
    if removed:
        print(f'removed {len(removed)} partial file(s) left by an interrupted write: {", ".join(removed)}')
    return created


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
    _pending_config.clear()
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
        _pending_config.update(folder=os.path.abspath(args.output_dir), created=created)
        if not resume:  # a resumed run rewrites config.yaml only once its checkpoint accepted the config
            _pending_config.update(path=os.path.join(args.output_dir, 'config.yaml'), text=text)
    barrier()
    if getattr(args, 'deterministic', False):
        use_deterministic_algorithms()
    seed_everything(args.seed + get_rank())
    tune_memory_allocator()
    return config, device
