"""One loader for ALBEF checkpoints of every task.

`load_checkpoint(model, source, variant)` reads a checkpoint (path, URL or in-memory dict; wrapped in
{'model': ...} or flat), detects which ALBEF variant produced it from its keys, rewrites it for the target
variant with the original's remaps, and then insists that the remaining differences between the checkpoint and the
model are exactly the ones expected for that (checkpoint kind -> model variant) pair. Anything else (a checkpoint
of another variant, another size, a truncated file) raises `CheckpointError` with the offending keys.

Remaps (all generalised from the hard-coded BERT-base numbers to any fusion layer f):

* `strip_bert`: text_encoder(_m).bert.X -> text_encoder(_m).X (pretraining MLM layout -> BertModel layout).
* `vqa_decoder`: text_decoder(_m).bert.embeddings <- the MLM encoder's embeddings; decoder layer j <- encoder
  layer f + j; text_decoder(_m).cls <- the MLM head (moved, as VQA.py does).
* `nlvr_duplicate`: encoder layer N >= f -> layers 2(N - f) + f and 2(N - f) + f + 1 (NLVR2 18-layer encoders).
* position embeddings of visual_encoder(_m) resampled to the model's grid (CLS row kept, bicubic,
  align_corners False).
* feature queues whose size differs from the model's are dropped (with queue_ptr), with a warning.
* momentum (_m) modules absent from the checkpoint are filled with the loaded online weights (the original left
  them random or at their pre-load state).

The pure pieces (`read_checkpoint`, `unwrap_state_dict`, `detect_kind`, `remap_state_dict`,
`check_state_dict`, `resample_pos_embed`) work on plain dicts and need no model.
"""
from __future__ import annotations

import math
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping

import torch
from timm.layers import resample_abs_pos_embed

from utils import UserError

__all__ = ['CheckpointError', 'load_checkpoint', 'read_checkpoint', 'unwrap_state_dict', 'detect_kind',
           'remap_state_dict', 'check_state_dict', 'resample_pos_embed', 'text_layout', 'canonical_variant',
           'shared_key_groups', 'first_non_finite', 'dtype_mismatches', 'SUPPORTED_SOURCES', 'KINDS']

KINDS = ('pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'pretrain_nlvr')
VARIANT_ALIASES = {'grounding': 'retrieval'}
QUEUE_KEYS = ('image_queue', 'text_queue', 'idx_queue')
POS_EMBED_KEYS = ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed')

STRIP_BERT, VQA_DECODER, NLVR_DUPLICATE = 'strip_bert', 'vqa_decoder', 'nlvr_duplicate'

# Checkpoint entries of a pretraining model that other variants have no use for.
_MLM_HEADS = ('text_encoder.cls.', 'text_encoder_m.cls.')
_PRETRAIN_EXTRAS = ('temp', 'image_queue', 'text_queue', 'queue_ptr', 'vision_proj.', 'text_proj.', 'itm_head.',
                    'vision_proj_m.', 'text_proj_m.')

# (checkpoint kind, model variant) -> (remaps in order, keys the model may miss, checkpoint keys it may not use).
# Entries ending in '.' are module prefixes, the others exact keys. Momentum modules, queues and position_ids have
# generic rules on top (see check_state_dict). Same-kind pairs are strict.
PAIR_RULES = {
    ('pretrain', 'retrieval'): ((STRIP_BERT,), ('idx_queue',), _MLM_HEADS),
    ('pretrain', 'vqa'): ((VQA_DECODER, STRIP_BERT), (), _PRETRAIN_EXTRAS),
    ('pretrain', 've'): ((STRIP_BERT,), ('cls_head.', 'cls_head_m.'), _MLM_HEADS + _PRETRAIN_EXTRAS),
    ('pretrain', 'nlvr'): ((STRIP_BERT, NLVR_DUPLICATE), ('cls_head.', 'cls_head_m.'),
                           _MLM_HEADS + _PRETRAIN_EXTRAS),
    ('pretrain', 'pretrain_nlvr'): ((STRIP_BERT, NLVR_DUPLICATE), ('ta_head.',),
                                    _MLM_HEADS + ('image_queue', 'text_queue', 'queue_ptr', 'itm_head.')),
    ('pretrain_nlvr', 'nlvr'): ((), ('cls_head.', 'cls_head_m.'), ('temp', 'vision_proj.', 'text_proj.',
                                                                   'ta_head.')),
}
for _k in KINDS:
    PAIR_RULES[(_k, _k)] = ((), (), ())

SUPPORTED_SOURCES = {v: tuple(k for (k, t) in PAIR_RULES if t == v) for v in KINDS}


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model (message: one line naming the culprit)."""


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------
def canonical_variant(variant: str) -> str:
    """Model variant name with aliases resolved ('grounding' -> 'retrieval'); CheckpointError when unknown."""
    v = VARIANT_ALIASES.get(variant, variant)
    if v not in KINDS:
        raise CheckpointError(f'unknown model variant {variant!r} (expected one of '
                              f'{", ".join(KINDS + tuple(VARIANT_ALIASES))})')
    return v


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith('.') and key.startswith(p)) for p in patterns)


def _is_momentum(key: str) -> bool:
    return key.split('.', 1)[0].endswith('_m')


def _module_of(key: str) -> str:
    return key.split('.', 1)[0]


def _online_key(momentum_key: str) -> str:
    head, _, rest = momentum_key.partition('.')
    return head[:-2] + ('.' + rest if rest else '')


def _short_list(items, limit=8) -> str:
    items = list(items)
    shown = ', '.join(items[:limit])
    return f'[{shown}{", ... (+%d more)" % (len(items) - limit) if len(items) > limit else ""}]'


def _describe(source) -> str:
    return '<in-memory dict>' if isinstance(source, Mapping) else str(source)


def _is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(('http://', 'https://'))


def url_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the host of `url` answers an HTTP request within `timeout` seconds (any status counts).

    Used before downloads so that an offline machine fails at once instead of hanging in urllib without timeout.
    """
    parts = urllib.parse.urlsplit(url)
    probe = f'{parts.scheme}://{parts.netloc}/'
    try:
        urllib.request.urlopen(urllib.request.Request(probe, method='HEAD'), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # the server answered, only not with 2xx
    except Exception:
        return False


def hub_cache_file(url: str, model_dir: str | None = None) -> str:
    """Where torch.hub.load_state_dict_from_url keeps (or would keep) the file downloaded from `url`."""
    model_dir = model_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    return os.path.join(model_dir, os.path.basename(urllib.parse.urlsplit(url).path))


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------
def _load_error(where: str, exc: Exception) -> CheckpointError:
    msg = str(exc)
    if 'Weights only load failed' in msg and 'Unsupported' in msg:
        m = re.search(r'GLOBAL (\S+)', msg)
        what = f' ({m.group(1)})' if m else ''
        return CheckpointError(
            f'checkpoint {where} contains pickled Python objects{what} that safe loading (torch.load '
            f'weights_only=True) refuses; if you trust this file, load it with allow_pickle=True '
            f'(command line: --unsafe_load)')
    first = msg.strip().splitlines()[0] if msg.strip() else ''
    first = first.split('. ')[0]  # torch's zip reader appends paragraphs of advice after the cause
    return CheckpointError(f'cannot read checkpoint {where}: the file is truncated or corrupt '
                           f'({type(exc).__name__}{": " + first[:200] if first else ""})')


def read_checkpoint(source, *, allow_pickle: bool = False, check_hash: bool = False):
    """Load a checkpoint object (usually a dict) from a path, an http(s) URL or return an in-memory mapping.

    Files are read with torch.load(map_location='cpu', weights_only=True) unless allow_pickle is set;
    '.safetensors' files with safetensors. URLs go through torch.hub.load_state_dict_from_url (cached under
    torch.hub's folder; `check_hash` verifies the hash prefix in the file name).
    Raises CheckpointError for a missing, truncated/corrupt or code-carrying file, or an unreachable URL.
    """
    if isinstance(source, Mapping):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise CheckpointError(f'checkpoint source must be a path, URL or dict, got {type(source).__name__}')
    if _is_url(source):
        cached = hub_cache_file(source)
        if not os.path.isfile(cached) and not url_reachable(source):
            raise CheckpointError(f'cannot download checkpoint {source}: host unreachable (offline?); download it '
                                  f'elsewhere and pass the local file, or place it at {cached}')
        try:
            return torch.hub.load_state_dict_from_url(source, map_location='cpu', check_hash=check_hash,
                                                      weights_only=not allow_pickle, progress=True)
        except (urllib.error.URLError, OSError) as e:
            raise CheckpointError(f'cannot download checkpoint {source}: {e}') from None
        except RuntimeError as e:
            if 'invalid hash value' in str(e):
                raise CheckpointError(f'checkpoint {source}: downloaded file fails its hash check ({e})') from None
            raise _load_error(source, e) from None
        except Exception as e:  # noqa: BLE001 - every unpickling failure becomes one readable line
            raise _load_error(source, e) from None
    if not os.path.exists(source):
        raise CheckpointError(f'checkpoint file not found: {source}')
    if os.path.isdir(source):
        raise CheckpointError(f'checkpoint path is a directory, not a file: {source}')
    if not stat.S_ISREG(os.stat(source).st_mode):  # torch.load would block forever on a FIFO
        raise CheckpointError(f'checkpoint path is not a regular file (a named pipe, socket or device): {source}')
    if source.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(source, device='cpu')
        except Exception as e:  # noqa: BLE001
            raise _load_error(source, e) from None
    try:
        return torch.load(source, map_location='cpu', weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF, key errors all mean "unreadable"
        raise _load_error(source, e) from None


def unwrap_state_dict(obj, where: str = '<checkpoint>'):
    """Return (state_dict, wrapped): the 'model' (or 'state_dict') entry when present, else the flat dict.

    A 'module.' prefix on every key (a DDP-wrapped save) is removed. Non-tensor entries raise CheckpointError.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint {where} holds a {type(obj).__name__}, not a dict')
    wrapped = False
    for key in ('model', 'state_dict'):
        if isinstance(obj.get(key), Mapping):
            obj, wrapped = obj[key], True
            break
    sd = dict(obj)
    if not sd:
        raise CheckpointError(f'checkpoint {where} holds an empty state dict')
    bad = [k for k, v in sd.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(f'checkpoint {where} has no state dict: entries {_short_list(map(str, bad))} are not '
                              f'tensors (top-level keys of a training checkpoint are model, optimizer, ...)')
    if all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd, wrapped


def _has(keys, prefix) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_kind(state_dict: Mapping) -> str:
    """Which ALBEF variant a state dict belongs to, from its keys (works for models' own state dicts too).

    vqa: text_decoder.*; pretrain_nlvr: ta_head.*; ve / nlvr: cls_head with 3 / 2 outputs; pretrain: the MLM
    layout text_encoder.bert.* / text_encoder.cls.*; retrieval: BertModel-layout text_encoder.* with itm_head
    (full, or flat/online-only like the released mscoco/flickr30k/refcoco files).
    """
    keys = list(state_dict)
    if _has(keys, 'text_decoder.') or _has(keys, 'text_decoder_m.'):
        return 'vqa'
    if _has(keys, 'ta_head.'):
        return 'pretrain_nlvr'
    if _has(keys, 'cls_head.') or _has(keys, 'cls_head_m.'):
        w = state_dict.get('cls_head.2.weight', state_dict.get('cls_head_m.2.weight'))
        if w is not None and w.ndim == 2 and w.shape[0] in (2, 3):
            return 've' if w.shape[0] == 3 else 'nlvr'
        raise CheckpointError('checkpoint has a cls_head but no cls_head.2.weight with 2 (NLVR2) or 3 (VE) '
                              'outputs; cannot tell which variant it belongs to')
    if _has(keys, 'text_encoder.bert.') or _has(keys, 'text_encoder.cls.'):
        return 'pretrain'
    if _has(keys, 'itm_head.') and _has(keys, 'text_encoder.'):
        return 'retrieval'
    raise CheckpointError(f'cannot tell which ALBEF variant this checkpoint belongs to (keys '
                          f'{_short_list(sorted(keys), 5)}); pass source_kind explicitly')


def text_layout(state_dict: Mapping, prefix: str):
    """(num_layers, fusion_layer) of the BERT body whose keys start with `prefix` (e.g. 'text_encoder.bert.').

    fusion_layer is the first layer owning crossattention (num_layers when none does). None when absent.
    """
    pat = re.compile(re.escape(prefix) + r'encoder\.layer\.(\d+)\.(.+)$')
    layers, cross = set(), set()
    for k in state_dict:
        m = pat.match(k)
        if m:
            n = int(m.group(1))
            layers.add(n)
            if m.group(2).startswith('crossattention.'):
                cross.add(n)
    if not layers:
        return None
    num = max(layers) + 1
    return num, (min(cross) if cross else num)


# ------------------------------------------------------------------------------------------------------------
# Remaps
# ------------------------------------------------------------------------------------------------------------
def resample_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a ViT position embedding [1, E + g^2, C] to [1, num_tokens, C].

    The model's extra (CLS) rows: E = num_tokens - n^2 for the model's square grid n; the checkpoint's grid is
    g = int(sqrt(len - E)). The E leading rows are kept; the grid is resized with bicubic interpolation,
    align_corners=False, no antialias (as the original; timm's `resample_abs_pos_embed` does it), computed in
    float32 and returned in the input dtype. Returns the input unchanged when the grids agree.
    """
    new = int(math.isqrt(num_tokens - 1))
    while new * new > num_tokens - 1:
        new -= 1
    extra = num_tokens - new * new
    orig = int(math.isqrt(pos_embed.shape[-2] - extra))
    if orig == new:
        return pos_embed
    if orig * orig + extra != pos_embed.shape[-2]:
        raise CheckpointError(f'position embedding of {pos_embed.shape[-2]} tokens is not {extra} extra token(s) '
                              f'plus a square grid')
    # timm's resize with antialias off is the original's bicubic resize, bit for bit (tests/test_checkpoint.py).
    return resample_abs_pos_embed(pos_embed, [new, new], [orig, orig], num_prefix_tokens=extra,
                                  interpolation='bicubic', antialias=False, align_corners=False)


def _strip_bert(sd, notes):
    out, n = {}, 0
    for k, v in sd.items():
        for pfx in ('text_encoder.bert.', 'text_encoder_m.bert.'):
            if k.startswith(pfx):
                k = pfx[:-len('bert.')] + k[len(pfx):]
                n += 1
                break
        out[k] = v
    if n:
        notes.append(f"strip_bert: {n} keys text_encoder(_m).bert.* -> text_encoder(_m).*")
    return out


def _vqa_decoder(sd, target, notes, allowed_missing):
    """Build text_decoder(_m) from the pretraining MLM encoder: embeddings, layers f.., and the MLM head."""
    out = dict(sd)
    for sfx in ('', '_m'):
        src, dst = f'text_encoder{sfx}.', f'text_decoder{sfx}.'
        layout = text_layout(sd, src + 'bert.')
        dec = text_layout(target, dst + 'bert.')
        if layout is None or dec is None:
            continue  # no such encoder in the checkpoint, or the model has no such decoder (no distill)
        n_src, f = layout
        n_dec = dec[0]
        copied = 0
        for k, v in sd.items():
            if k.startswith(src + 'bert.embeddings.'):
                out[dst + k[len(src):]] = v
                copied += 1
            elif k.startswith(src + 'cls.'):
                out[dst + k[len(src):]] = v  # moved, as VQA.py does (the encoder has no MLM head)
                del out[k]
                copied += 1
        layer_pat = re.compile(re.escape(src) + r'bert\.encoder\.layer\.(\d+)\.(.+)$')
        for k, v in sd.items():
            m = layer_pat.match(k)
            if m and int(m.group(1)) >= f and int(m.group(1)) - f < n_dec:
                out[f'{dst}bert.encoder.layer.{int(m.group(1)) - f}.{m.group(2)}'] = v
                copied += 1
        notes.append(f'vqa_decoder: {dst}bert.encoder.layer.j <- {src}bert.encoder.layer.{f}+j '
                     f'(j < {min(n_dec, n_src - f)}), embeddings and cls head from the MLM encoder ({copied} keys)')
        if n_src - f < n_dec:
            allowed_missing.update(f'{dst}bert.encoder.layer.{j}.' for j in range(n_src - f, n_dec))
            warnings.warn(f'checkpoint has only {n_src - f} fusion layers: {dst} layers {n_src - f}..{n_dec - 1} '
                          f'keep their current weights')
        # The decoder's cross-attention reads question states (hidden width); the encoder's read image tokens
        # (vision width). When those widths differ the key/value projections cannot be transferred.
        for k in [k for k in out if k.startswith(dst) and re.search(r'crossattention\.self\.(key|value)\.', k)]:
            if k in target and tuple(out[k].shape) != tuple(target[k].shape):
                del out[k]
                allowed_missing.add(k)
                notes.append(f'vqa_decoder: {k} not transferable (checkpoint {tuple(_source_shape(sd, k, f, src))} '
                             f'vs model {tuple(target[k].shape)}), keeps its current weights')
    return out


def _source_shape(sd, dec_key, f, src):
    """Shape of the encoder tensor a decoder key was copied from (for messages)."""
    m = re.match(r'text_decoder(_m)?\.bert\.encoder\.layer\.(\d+)\.(.+)$', dec_key)
    if not m:
        return ()
    return sd[f'{src}bert.encoder.layer.{int(m.group(2)) + f}.{m.group(3)}'].shape


def _nlvr_duplicate(sd, target, notes):
    """Fusion layer N of a 12-layer-style encoder -> layers 2(N-f)+f and 2(N-f)+f+1 of the NLVR2 encoder."""
    out = dict(sd)
    for pfx in ('text_encoder.', 'text_encoder_m.'):
        layout, tgt = text_layout(sd, pfx), text_layout(target, pfx)
        if layout is None or tgt is None:
            continue
        n_src, f = layout
        if tgt == layout:
            continue  # already in the duplicated layout
        if tgt != (f + 2 * (n_src - f), f):
            raise CheckpointError(
                f'{pfx[:-1]}: checkpoint has {n_src} layers with fusion from {f}, which duplicate to '
                f'{f + 2 * (n_src - f)} layers; the model has {tgt[0]} layers with fusion from {tgt[1]}')
        pat = re.compile(re.escape(pfx) + r'encoder\.layer\.(\d+)\.(.+)$')
        copies = {}
        for k, v in sd.items():
            m = pat.match(k)
            if m and int(m.group(1)) >= f:
                n = int(m.group(1))
                del out[k]
                for j in (2 * (n - f) + f, 2 * (n - f) + f + 1):
                    copies[f'{pfx}encoder.layer.{j}.{m.group(2)}'] = v
        out.update(copies)  # after all deletions: new names overlap old ones (old layer f+1 -> new f+2, f+3)
        notes.append(f'nlvr_duplicate: {pfx}encoder.layer.N (N >= {f}) -> layers 2(N-{f})+{f} and 2(N-{f})+{f + 1}')
    return out


def remap_state_dict(state_dict: Mapping, source_kind: str, variant: str, target: Mapping):
    """Rewrite a checkpoint state dict of `source_kind` for a model `variant` whose state dict is `target`.

    `target` maps model keys to tensors (only shapes are read). Applies the pair's named remaps, then
    resamples visual_encoder(_m).pos_embed to the model's grid and drops queues whose size differs.
    Returns (new_state_dict, notes, allowed_missing): notes describe the remaps applied; allowed_missing holds
    keys/prefixes the remaps leave legitimately unfilled. Raises CheckpointError for an unsupported pair.
    """
    variant = canonical_variant(variant)
    if (source_kind, variant) not in PAIR_RULES:
        raise CheckpointError(
            f"a '{source_kind}' checkpoint cannot initialise a '{variant}' model (supported sources for "
            f"{variant}: {', '.join(SUPPORTED_SOURCES[variant])}); wrong checkpoint or wrong task?")
    ops = PAIR_RULES[(source_kind, variant)][0]
    sd, notes, allowed_missing = dict(state_dict), [], set()
    for op in ops:
        if op == STRIP_BERT:
            sd = _strip_bert(sd, notes)
        elif op == VQA_DECODER:
            sd = _vqa_decoder(sd, target, notes, allowed_missing)
        elif op == NLVR_DUPLICATE:
            sd = _nlvr_duplicate(sd, target, notes)

    for key in POS_EMBED_KEYS:
        if key in sd and key in target:
            have, want = sd[key].shape, target[key].shape
            if have != want and have[-1] == want[-1] and len(have) == 3:
                sd[key] = resample_pos_embed(sd[key], want[-2])
                notes.append(f'resample {key}: {have[-2]} -> {want[-2]} tokens (bicubic)')

    dropped = []
    for key in QUEUE_KEYS:
        if key in sd and key in target:
            have, want = tuple(sd[key].shape), tuple(target[key].shape)
            if have != want and have[:-1] == want[:-1]:
                del sd[key]
                dropped.append(key)
                warnings.warn(f'checkpoint {key} holds {have[-1]} entries, the model {want[-1]}: dropped '
                              f'(the model keeps its fresh queue)')
    if dropped:
        allowed_missing.update(dropped)
        if 'queue_ptr' in sd:  # the pointer indexes the dropped queues
            del sd['queue_ptr']
            dropped.append('queue_ptr')
        allowed_missing.add('queue_ptr')
        notes.append(f'dropped {", ".join(dropped)} (queue size differs from the model)')
    return sd, notes, allowed_missing


# ------------------------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------------------------
def first_non_finite(state_dict: Mapping) -> str | None:
    """The first key (in order) of a floating-point or complex tensor holding NaN or inf, or None (meta tensors,
    which hold no values, are skipped)."""
    for k, v in state_dict.items():
        if (torch.is_tensor(v) and not v.is_meta and (v.is_floating_point() or v.is_complex())
                and not torch.isfinite(v).all()):
            return k
    return None


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return 'complex'
    if dtype.is_floating_point:
        return 'floating'
    return 'bool' if dtype == torch.bool else 'integer'


def dtype_mismatches(state_dict: Mapping, target: Mapping) -> list[str]:
    """'key: checkpoint <dtype> vs model <dtype>' for every shared key whose kinds of dtype differ.

    Floating into floating (fp16 / bf16 / fp32 / fp64) converts fine; integer, bool or complex values into a
    floating tensor (or the reverse) would be cast silently (every weight read as 0 or 1, imaginary parts dropped).
    """
    out = []
    for k in state_dict:
        if k in target and torch.is_tensor(state_dict[k]):
            have, want = state_dict[k].dtype, target[k].dtype
            if _dtype_kind(have) != _dtype_kind(want):
                out.append(f'{k}: checkpoint {str(have).replace("torch.", "")} vs model '
                           f'{str(want).replace("torch.", "")}')
    return out


def shared_key_groups(module: torch.nn.Module):
    """Lists of state-dict keys that name the same tensor in `module` (tied embeddings, NLVR key/value pairs)."""
    by_id = {}
    for k, v in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    return [ks for ks in by_id.values() if len(ks) > 1]


def check_state_dict(state_dict: dict, target: Mapping, source_kind: str, variant: str, *,
                     allowed_missing=(), shared_groups=(), source_has_momentum=None):
    """Compare a remapped checkpoint with the model's state dict and raise on anything unexpected.

    Allowed differences: the pair's own lists (PAIR_RULES), `allowed_missing` (from the remaps); momentum
    modules wholly absent from the checkpoint (filled from the online weights after loading); momentum modules
    the model does not have (built without distillation); queues when the checkpoint carries no momentum
    weights at all (online-only files like mscoco.pth); BERT position_ids (a constant buffer).
    Entries of a shared group given only once are filled in for the other names (in place); shared entries with
    different values raise.
    Returns a dict: missing, unexpected (sorted lists), momentum_fill (momentum modules to copy from online).
    """
    variant = canonical_variant(variant)
    _, pair_missing, pair_unexpected = PAIR_RULES[(source_kind, variant)]
    if source_has_momentum is None:
        source_has_momentum = any(_is_momentum(k) for k in state_dict)
    bad = first_non_finite(state_dict)
    if bad is not None:  # before the shared-tensor comparison, where NaN != NaN would blame tied weights
        raise CheckpointError(f'checkpoint holds non-finite values (NaN or inf) in {bad}: it comes from a diverged '
                              f'run or is corrupt')
    bad_dtype = dtype_mismatches(state_dict, target)
    if bad_dtype:
        raise CheckpointError(f"'{source_kind}' checkpoint does not fit the '{variant}' model: dtype mismatch "
                              f"{_short_list(bad_dtype, 4)} (integer, bool or complex values cannot stand for "
                              f"floating-point weights)")

    for group in shared_groups:
        given = [k for k in group if k in state_dict]
        if not given:
            continue
        ref = state_dict[given[0]]
        for k in given[1:]:
            v = state_dict[k]
            if v.shape != ref.shape or not torch.equal(v.to(ref.dtype), ref):
                raise CheckpointError(f'checkpoint gives different values to {given[0]} and {k}, which are one '
                                      f'shared tensor in the model')
        for k in group:
            state_dict.setdefault(k, ref)

    model_keys, ckpt_keys = set(target), set(state_dict)
    missing = sorted(model_keys - ckpt_keys)
    unexpected = sorted(ckpt_keys - model_keys)
    ckpt_modules = {_module_of(k) for k in ckpt_keys}
    model_modules = {_module_of(k) for k in model_keys}

    bad_missing, momentum_fill = [], set()
    for k in missing:
        # A momentum module the checkpoint lacks entirely takes the online weights after loading (also when the
        # pair lists it, e.g. cls_head_m next to a fresh cls_head, so that both start equal).
        fillable = _is_momentum(k) and _module_of(k) not in ckpt_modules and _online_key(k) in target
        if fillable:
            momentum_fill.add(_module_of(k))
        if (fillable or _matches(k, pair_missing) or _matches(k, allowed_missing)
                or k.endswith('embeddings.position_ids')
                or (k in QUEUE_KEYS + ('queue_ptr',) and not source_has_momentum)):
            continue
        bad_missing.append(k)
    model_has_queues = any(k in model_keys for k in QUEUE_KEYS)
    bad_unexpected = [k for k in unexpected
                      if not (_matches(k, pair_unexpected) or k.endswith('embeddings.position_ids')
                              or (_is_momentum(k) and _module_of(k) not in model_modules)
                              or (k in QUEUE_KEYS + ('queue_ptr',) and not model_has_queues))]
    bad_shape = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
                 for k in sorted(ckpt_keys & model_keys) if tuple(state_dict[k].shape) != tuple(target[k].shape)]
    if bad_missing or bad_unexpected or bad_shape:
        parts = []
        if bad_shape:
            parts.append(f'shape mismatch {_short_list(bad_shape, 4)}')
        if bad_missing:
            parts.append(f'missing {_short_list(bad_missing)}')
        if bad_unexpected:
            parts.append(f'unexpected {_short_list(bad_unexpected)}')
        raise CheckpointError(f"'{source_kind}' checkpoint does not fit the '{variant}' model: " + '; '.join(parts))
    return {'missing': missing, 'unexpected': unexpected, 'momentum_fill': sorted(momentum_fill)}


# ------------------------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------------------------
def load_checkpoint(model: torch.nn.Module, source, variant: str, *, source_kind: str = 'auto',
                    allow_pickle: bool = False) -> dict:
    """Load an ALBEF checkpoint into `model` (the `models.model_class(variant)` model), remapping as the original does.

    source: path, http(s) URL or an in-memory dict, with or without a 'model' wrapper.
    variant: the model's task (pretrain, retrieval, grounding, vqa, nlvr, ve, pretrain_nlvr).
    source_kind: 'auto' (detect from the keys) or one of KINDS to override detection.
    allow_pickle: allow files holding pickled code (only for trusted files; CLI --unsafe_load).

    Raises CheckpointError when the file cannot be read (missing, not a regular file, truncated, pickled code),
    holds NaN or inf (naming the first such key), or does not fit the model beyond the differences expected for the
    (source kind -> variant) pair, including dtypes: floating into floating converts, integer / bool / complex
    values where the model has floating-point tensors (or the reverse) are refused, since a cast would silently
    turn every weight into 0 or 1. A same-variant checkpoint loads strictly.
    Returns a report dict: source, source_kind, variant, wrapped, source_has_momentum, remaps (list of str),
    missing / unexpected (keys left at model values / ignored), momentum_copied (momentum modules filled from
    the online weights), strict (True when nothing was missing or ignored).
    """
    where = _describe(source)
    variant = canonical_variant(variant)
    target = model.state_dict(keep_vars=True)
    model_kind = detect_kind(target)
    if model_kind != variant:
        raise CheckpointError(f"variant {variant!r} given, but the model's parameters are those of a "
                              f"'{model_kind}' model")
    obj = read_checkpoint(source, allow_pickle=allow_pickle)
    sd, wrapped = unwrap_state_dict(obj, where)
    bad = first_non_finite(sd)  # named as in the file, before the remaps rename keys
    if bad is not None:
        raise CheckpointError(f'{where}: non-finite values (NaN or inf) in {bad}: the checkpoint comes from a '
                              f'diverged run or is corrupt')
    if source_kind == 'auto':
        source_kind = detect_kind(sd)
    else:
        source_kind = canonical_variant(source_kind)
    has_momentum = any(_is_momentum(k) for k in sd)

    try:
        new_sd, notes, allowed = remap_state_dict(sd, source_kind, variant, target)
    except CheckpointError as e:
        raise CheckpointError(f'{where}: {e}') from None
    try:
        result = check_state_dict(new_sd, target, source_kind, variant, allowed_missing=allowed,
                                  shared_groups=shared_key_groups(model), source_has_momentum=has_momentum)
    except CheckpointError as e:
        raise CheckpointError(f'{where}: {e}') from None

    load_result = model.load_state_dict(new_sd, strict=False)
    # check_state_dict computed the same sets; a difference would be a bug in this module, not in the file.
    if (sorted(load_result.missing_keys) != result['missing']
            or sorted(load_result.unexpected_keys) != result['unexpected']):
        raise RuntimeError('load_checkpoint: key bookkeeping out of sync with load_state_dict')

    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for module in result['momentum_fill']:
            for k, v in state.items():
                if _module_of(k) == module:
                    v.data.copy_(state[_online_key(k)].data)
    if result['momentum_fill']:
        notes.append(f'momentum modules copied from the online weights: {", ".join(result["momentum_fill"])}')
    for n in notes:
        if n.startswith(('resample', 'momentum', 'dropped')):
            print(n)
    print(f'load checkpoint from {where} ({source_kind} -> {variant}): {len(result["missing"])} missing, '
          f'{len(result["unexpected"])} unused keys')
    return {
        'source': where,
        'source_kind': source_kind,
        'variant': variant,
        'wrapped': wrapped,
        'source_has_momentum': has_momentum,
        'remaps': notes,
        'missing': result['missing'],
        'unexpected': result['unexpected'],
        'momentum_copied': result['momentum_fill'],
        'strict': not result['missing'] and not result['unexpected'],
    }
