"""Config files: safe, bounded YAML loading, validation against the schema, --opt overrides, saving.

The top-level keys are declared in CONFIG_SCHEMA. The keys of a nested block (`optimizer:`, `schedular:`,
`augment:`, ...) and the checks that relate keys to each other belong to the module that reads them, which
declares them here when it is imported (`register_block`, `register_check`): dataset/ for `augment:`, optim/ for
`optimizer:`, scheduler/ for `schedular:`, models/ for `bert_config` and the model sizes. A caller that validates a
config imports those packages first (the task scripts, and models' checkpoint loader, do).
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from utils.errors import ConfigError
from utils.files import atomic_write_text, read_limited
from utils.schema import FILES, NONE, NUM, SHARE, Spec, size_spec, suggest

# Every top-level key a config may hold, with its accepted types and range. Keys from the original ALBEF configs
# plus our additions (whose defaults, applied where they are read, reproduce the original). The caps on sizes are
# far above any real model (ViT-g is 1408 wide, the original queue holds 65536) and far below what would make the
# run die in an allocation minutes later.
CONFIG_SCHEMA: dict[str, Spec] = {
    # data
    'train_file': FILES, 'val_file': FILES, 'test_file': FILES,
    'image_root': Spec((str,)), 'vqa_root': Spec((str,)), 'vg_root': Spec((str,)), 'answer_list': Spec((str,)),
    'refcoco_data': Spec((str,)), 'det_file': Spec((str,)), 'coco_file': Spec((str,)), 'eos': Spec((str,)),
    'max_words': size_spec(65536), 'augment': Spec((dict,)), 'skip_bad_images': Spec((bool,)),
    'allow_absolute_paths': Spec((bool,)),
    'num_workers': Spec((int,), 0, cap=256, why='each worker is a process holding a copy of the dataset'),
    # model
    'bert_config': Spec((str, dict)), 'image_res': size_spec(4096), 'patch_size': size_spec(1024),
    'vision_width': size_spec(16384), 'vision_depth': size_spec(256), 'vision_num_heads': size_spec(1024),
    'mlp_ratio': Spec(NUM, 0, lo_open=True, cap=64), 'embed_dim': size_spec(16384),
    'vision_init_std': Spec(NUM, 0, lo_open=True), 'attention_qk_init_std': Spec(NUM, 0, lo_open=True),
    'temp': Spec(NUM, 0, 1, lo_open=True), 'learn_temp': Spec((bool,)), 'mlm_probability': SHARE,
    'itm_random_negatives': SHARE, 'queue_size': size_spec(1 << 20), 'momentum': SHARE, 'alpha': SHARE,
    'distill': Spec((bool,)), 'vqa_decoder_layers': size_spec(256), 'grad_checkpointing': Spec((bool, list)),
    'text_encoder': Spec((str,)), 'text_decoder': Spec((str,)), 'load_text_weights': Spec((bool,)),
    'vision_pretrained': Spec((str, NONE)), 'freeze_vision': Spec((bool,)),
    # training / evaluation
    'batch_size': size_spec(65536), 'batch_size_train': size_spec(65536), 'batch_size_test': size_spec(65536),
    'k_test': size_spec(65536), 'warm_up': Spec((bool,)), 'eval_ema': Spec((bool,)),
    'precision': Spec((str,), choices=('fp32', 'bf16', 'fp16')), 'grad_accum_steps': size_spec(65536),
    'print_freq': Spec((int,), 0, lo_open=True), 'itm_batch_size': size_spec(1 << 20),
    'score': Spec((str,), choices=('itm', 'itm+itc', 'itc')),
    'ddp_bucket_cap_mb': Spec(NUM, 0, lo_open=True, cap=65536), 'epoch_checkpoint_every': Spec((int,), 0),
    'optimizer': Spec((dict,)), 'schedular': Spec((dict,)), 'scheduler': Spec((dict,)),
    'zero': Spec((bool,)), 'compile': Spec((bool,)),
}

# Bounds on the work of reading a config, which may come from anywhere: a few KB of YAML whose aliases repeat each
# other ("billion laughs") would otherwise expand to billions of values. Real configs hold a few hundred values.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32


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
# The registry of the blocks' schemas and of the whole-config checks
# ----------------------------------------------------------------------------------------------------------------
class Block(NamedTuple):
    """A nested block's keys (`schema`), the keys it must hold, and an optional `check(path, block)` of values."""
    schema: Mapping[str, Spec]
    required: Sequence[str] = ()
    check: Callable[[str, Mapping], None] | None = None


_BLOCKS: dict[str, Block] = {}
_CHECKS: list[Callable[[str, Mapping], None]] = []


def register_block(name: str, schema: Mapping[str, Spec], check: Callable[[str, Mapping], None] | None = None,
                   required: Sequence[str] = ()) -> None:
    """Declare the keys of the config block `name` (a top-level key of CONFIG_SCHEMA holding a mapping).

    validate_config refuses a key not in `schema` (with a suggestion), a missing `required` key and a value its
    Spec refuses, naming it 'name.key'; then calls `check(path, block)` for what a Spec cannot say. Registering a
    name again replaces its entry (a module reloaded in a test)."""
    if name not in CONFIG_SCHEMA:
        raise KeyError(f'register_block: {name!r} is not a key of CONFIG_SCHEMA')
    _BLOCKS[name] = Block(dict(schema), tuple(required), check)


def register_check(check: Callable[[str, Mapping], None]) -> None:
    """Add `check(path, config)`, run by validate_config on every config after the keys' own checks (relations
    between keys); it raises ConfigError. A function registered twice runs once."""
    if check not in _CHECKS:
        _CHECKS.append(check)


def registered_blocks() -> dict[str, Mapping[str, Spec]]:
    """{block name: its schema} of the blocks declared so far."""
    return {name: block.schema for name, block in _BLOCKS.items()}


def _check_block(path: str, block_name: str, block: Mapping, spec: Block) -> None:
    schema = spec.schema
    for key in block:
        if key not in schema:
            raise ConfigError(f"{path}: unknown key '{block_name}.{key}'{suggest(str(key), schema)}")
    for key in spec.required:
        if key not in block:
            raise ConfigError(f"{path}: missing required key '{block_name}.{key}'")
    for key, value in block.items():
        found = schema[key].problem(value)
        if found is not None:
            raise ConfigError(f"{path}: key '{block_name}.{key}' {found}")
    if spec.check is not None:
        spec.check(path, block)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
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


def validate_config(config: Mapping, path: str = '<config>', required: Sequence[str] = ()) -> None:
    """Check keys, types and value ranges (CONFIG_SCHEMA and the registered blocks' schemas), and the registered
    checks between keys; raise ConfigError naming the file and the key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f'{path}: top level must be a mapping of keys to values, got {type(config).__name__}')
    values = list(_walk(path, config))  # bounded: refuses recursive, huge or too deeply nested configs first
    for key, value in config.items():
        if key not in CONFIG_SCHEMA:
            raise ConfigError(f"{path}: unknown key '{key}'{suggest(str(key), CONFIG_SCHEMA)}")
        found = CONFIG_SCHEMA[key].problem(value)
        if found is not None:
            raise ConfigError(f"{path}: key '{key}' {found}")
    for key in required:
        if key not in config:
            raise ConfigError(f"{path}: missing required key '{key}'")
    for name, block in _BLOCKS.items():
        if name in config:
            _check_block(path, name, config[name], block)
    for key, value in values:
        if isinstance(value, float) and not np.isfinite(value):
            raise ConfigError(f"{path}: key '{key}' must be a finite number, got {value}")
    for check in _CHECKS:
        check(path, config)


# ----------------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------------
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
    data = read_limited(path, 'config file')
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
