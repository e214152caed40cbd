"""Initialising ALBEF's encoders from public pretrained weights.

* `load_bert_weights(text_module, name_or_path)`: a Hugging Face BERT (hub name such as 'bert-base-uncased', or
  a folder written by save_pretrained) into one of our xbert modules. As the original's
  `from_pretrained`, every tensor with a counterpart is copied (layer i <- BERT layer i); cross-attention, and
  layers beyond the checkpoint's depth (layers 12-17 of the NLVR2 encoder), keep their fresh initialisation; the
  checkpoint's pooler / next-sentence head are ignored.
* `load_vision_weights(visual_encoder, source)`: 'deit_base' (the DeiT-base URL the original downloads), a timm
  model name, a URL, or a local .pth / .safetensors file into our ViT; pos_embed resampled to the model's grid,
  classification head dropped.
* `apply_pretrained(model, config)`: what the config asks (text_encoder, load_text_weights,
  vision_pretrained) for the online modules of a model. The caller then runs `model.copy_params()`.

Nothing here hangs without network: hub names are tried from the local cache first, and a download is only
attempted after the host answered a short probe; otherwise a one-line `CheckpointError` names what was asked for.
"""
from __future__ import annotations

import os

import torch

from models import checkpoint as ckpt
from models.checkpoint import CheckpointError, resample_pos_embed

__all__ = ['DEIT_BASE_URL', 'load_bert_weights', 'load_vision_weights', 'apply_pretrained']

DEIT_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth'
_TIMM_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin')


def _env_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')


def _hf_endpoint() -> str:
    return os.environ.get('HF_ENDPOINT', 'https://huggingface.co')


def _looks_like_path(name: str) -> bool:
    # Hub names are 'name' or 'org/name'; anything else with slashes or a file suffix is meant as a path.
    return (name.startswith(('.', '/', '~')) or name.count('/') > 1
            or name.endswith(('.json', '.bin', '.safetensors', '.pth', '.pt')))


# ------------------------------------------------------------------------------------------------------------
# BERT
# ------------------------------------------------------------------------------------------------------------
def _read_hf_bert(name_or_path: str):
    """(state_dict with 'bert.' / 'cls.' keys, set of keys the checkpoint did not provide) via transformers."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    local = os.path.isdir(os.path.expanduser(name_or_path))
    if not local and (os.path.exists(os.path.expanduser(name_or_path)) or _looks_like_path(name_or_path)):
        what = 'is a file, not a folder' if os.path.exists(os.path.expanduser(name_or_path)) else 'no such folder'
        raise CheckpointError(f'text_encoder {name_or_path!r}: {what} (expected a save_pretrained folder with '
                              f'config.json and model.safetensors or pytorch_model.bin, or a hub name)')
    path = os.path.expanduser(name_or_path) if local else name_or_path
    if local and not os.path.isfile(os.path.join(path, 'config.json')):
        raise CheckpointError(f'text_encoder {name_or_path!r}: folder has no config.json (write it with '
                              f'save_pretrained)')
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists the heads we drop anyway
    hf_logging.disable_progress_bar()
    try:
        try:
            model, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True,
                                                          local_files_only=True)
        except OSError as e:
            if local:
                raise CheckpointError(f'text_encoder {name_or_path!r}: cannot load BERT weights from the folder '
                                      f'({str(e).splitlines()[0][:200]})') from None
            # Not in the local cache: download only when the hub answers (else transformers retries for long).
            if _env_offline() or not ckpt.url_reachable(_hf_endpoint()):
                raise CheckpointError(
                    f'text_encoder {name_or_path!r}: not a local folder, not in the Hugging Face cache, and the '
                    f'hub is unreachable (offline); pass a folder written by save_pretrained') from None
            try:
                model, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
            except OSError as e2:
                raise CheckpointError(f'text_encoder {name_or_path!r}: cannot download BERT weights '
                                      f'({str(e2).splitlines()[0][:200]})') from None
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f'text_encoder {name_or_path!r}: not a loadable BERT checkpoint '
                                  f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""})') from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = set(info.get('missing_keys', ()))
    missing |= {m if isinstance(m, str) else m[0] for m in info.get('mismatched_keys', ())}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return sd, missing


def load_bert_weights(text_module: torch.nn.Module, name_or_path: str) -> dict:
    """Copy a Hugging Face BERT checkpoint into our xbert `text_module` (BertModel, BertForMaskedLM or
    BertLMHeadModel).

    Layer i <- checkpoint layer i for i < min(depths); embeddings; the MLM head ('cls.*') for the wrappers when
    the checkpoint has one. Cross-attention, extra layers (NLVR2 layers beyond the checkpoint's 12) and a head the
    checkpoint lacks keep their current (fresh) values. Raises CheckpointError when the checkpoint is missing,
    unreachable, not BERT, or of another size (names the key and both shapes).
    Returns {'source', 'loaded': n, 'kept': [keys left as they were], 'ignored': [checkpoint keys not used]}.
    """
    hf_sd, hf_missing = _read_hf_bert(name_or_path)
    absent_body = sorted(k for k in hf_missing if k.startswith('bert.') and 'position_ids' not in k)
    if absent_body:
        raise CheckpointError(f'text_encoder {name_or_path!r}: checkpoint lacks BERT weights '
                              f'{ckpt._short_list(absent_body, 4)} (not a BERT checkpoint?)')
    ours = text_module.state_dict()
    wrapped = any(k.startswith('bert.') for k in ours)
    mapped, ignored = {}, []
    for k, v in hf_sd.items():
        if k.startswith('bert.'):
            name = k if wrapped else k[len('bert.'):]
        elif k.startswith('cls.predictions.') and wrapped and k not in hf_missing:
            name = k
        else:
            ignored.append(k)  # pooler, next-sentence head, an MLM head our BertModel does not have
            continue
        if name not in ours:
            ignored.append(k)  # e.g. layers beyond our depth (the 6-layer VQA decoder)
            continue
        if tuple(ours[name].shape) != tuple(v.shape):
            raise CheckpointError(f'text_encoder {name_or_path!r}: {k} has shape {tuple(v.shape)} in the '
                                  f'checkpoint but {tuple(ours[name].shape)} in the model (bert_config does not '
                                  f'match this BERT)')
        mapped[name] = v
    result = text_module.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # cannot happen: names were checked against the module
        raise RuntimeError(f'load_bert_weights: unexpected {result.unexpected_keys[:4]}')
    print(f'load BERT weights from {name_or_path}: {len(mapped)} tensors, {len(result.missing_keys)} kept fresh')
    return {'source': name_or_path, 'loaded': len(mapped), 'kept': sorted(result.missing_keys),
            'ignored': sorted(ignored)}


# ------------------------------------------------------------------------------------------------------------
# Vision
# ------------------------------------------------------------------------------------------------------------
def _timm_state_dict(name: str):
    """State dict of timm model `name` with its pretrained weights (local cache first; download if reachable)."""
    import timm
    if not timm.is_model(name):
        raise CheckpointError(f"vision_pretrained {name!r}: not a file, not 'deit_base', and not a timm model name")
    cfg = timm.models.get_pretrained_cfg(name)
    cached = None
    if cfg is not None and getattr(cfg, 'hf_hub_id', None):
        from huggingface_hub import try_to_load_from_cache
        repo = cfg.hf_hub_id
        for fname in _TIMM_WEIGHT_FILES:
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                cached = hit
                break
    if cached is None and cfg is not None and getattr(cfg, 'url', None):
        hit = ckpt.hub_cache_file(cfg.url)
        cached = hit if os.path.isfile(hit) else None
    try:
        if cached is not None:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=cached))
        else:
            probe = _hf_endpoint() if getattr(cfg, 'hf_hub_id', None) else getattr(cfg, 'url', None)
            if probe is None:
                raise CheckpointError(f'vision_pretrained {name!r}: timm has no pretrained weights for it')
            if (_env_offline() and getattr(cfg, 'hf_hub_id', None)) or not ckpt.url_reachable(probe):
                raise CheckpointError(f'vision_pretrained {name!r}: weights not in the local cache and '
                                      f'{probe} is unreachable (offline); pass a local .pth/.safetensors file')
            model = timm.create_model(name, pretrained=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - timm/hub errors of many kinds become one line
        raise CheckpointError(f'vision_pretrained {name!r}: cannot load timm weights ({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:200] if str(e) else ""})') from None
    return {k: v.detach() for k, v in model.state_dict().items()}


def _vision_state_dict(source: str, allow_pickle: bool):
    try:
        return _read_vision(source, allow_pickle)
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith('vision_pretrained') else f'vision_pretrained: {msg}') from None


def _read_vision(source: str, allow_pickle: bool):
    if source == 'deit_base':
        return ckpt.unwrap_state_dict(ckpt.read_checkpoint(DEIT_BASE_URL, check_hash=True,
                                                           allow_pickle=allow_pickle), DEIT_BASE_URL)[0]
    if ckpt._is_url(source) or os.path.exists(os.path.expanduser(source)) or _looks_like_path(source):
        path = source if ckpt._is_url(source) else os.path.expanduser(source)
        return ckpt.unwrap_state_dict(ckpt.read_checkpoint(path, allow_pickle=allow_pickle), source)[0]
    return _timm_state_dict(source)


def load_vision_weights(visual_encoder: torch.nn.Module, source: str, *, allow_pickle: bool = False) -> dict:
    """Load pretrained ViT weights into our `visual_encoder` (models.vit.VisionTransformer).

    source: 'deit_base' (DeiT-base/16 at 224 from the original's URL, hash-checked, cached by torch.hub), a timm
    model name (its pretrained weights), an http(s) URL, or a local .pth/.pt/.bin/.safetensors file (flat, or
    under 'model'/'state_dict'; an ALBEF checkpoint's visual_encoder.* entries also work).
    pos_embed is resampled to the model's grid; head.* (classifier) entries are dropped. Any other
    difference (missing blocks, other width) raises CheckpointError naming the keys.
    Returns {'source', 'loaded': n, 'dropped': [keys], 'resampled': (old tokens, new tokens) or None}.
    """
    sd = dict(_vision_state_dict(source, allow_pickle))
    if 'cls_token' not in sd and 'visual_encoder.cls_token' in sd:
        sd = {k[len('visual_encoder.'):]: v for k, v in sd.items() if k.startswith('visual_encoder.')}
    dropped = sorted(k for k in sd if k.startswith(('head.', 'head_dist.', 'fc_norm.')) and k not in
                     visual_encoder.state_dict())
    for k in dropped:
        del sd[k]
    ours = visual_encoder.state_dict()
    resampled = None
    if 'pos_embed' in sd and 'pos_embed' in ours and sd['pos_embed'].shape != ours['pos_embed'].shape \
            and sd['pos_embed'].shape[-1] == ours['pos_embed'].shape[-1]:
        old = sd['pos_embed'].shape[-2]
        sd['pos_embed'] = resample_pos_embed(sd['pos_embed'], ours['pos_embed'].shape[-2])
        resampled = (old, ours['pos_embed'].shape[-2])
        print(f'reshape position embedding from {old - 1} to {ours["pos_embed"].shape[-2] - 1}')
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    shapes = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}'
              for k in sorted(set(sd) & set(ours)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f'shape mismatch {ckpt._short_list(shapes, 3)}')
        if missing:
            parts.append(f'missing {ckpt._short_list(missing, 6)}')
        if unexpected:
            parts.append(f'unexpected {ckpt._short_list(unexpected, 6)}')
        raise CheckpointError(f'vision_pretrained {source!r} does not fit the ViT (image_res/patch_size/'
                              f'vision_width/vision_depth): ' + '; '.join(parts))
    visual_encoder.load_state_dict(sd, strict=True)
    print(f'load ViT weights from {source}: {len(sd)} tensors')
    return {'source': source, 'loaded': len(sd), 'dropped': dropped, 'resampled': resampled}


# ------------------------------------------------------------------------------------------------------------
# Config-driven entry point
# ------------------------------------------------------------------------------------------------------------
def apply_pretrained(model: torch.nn.Module, config, text_encoder: str | None = None) -> dict:
    """Initialise the online encoders of `model` as the config asks (before any ALBEF checkpoint).

    config keys (team contract): text_encoder (hub name or folder; overridden by the `text_encoder` argument),
    load_text_weights (default True; False keeps BERT at random init, as the toy world does), text_decoder
    (VQA only; defaults to the text encoder's source), vision_pretrained (None, 'deit_base', a timm name or a
    local file). BERT weights go into model.text_encoder and, when present, model.text_decoder; vision weights
    into model.visual_encoder. Momentum copies are NOT touched: call model.copy_params() afterwards.
    Returns {'text_encoder': report, 'text_decoder': report, 'visual_encoder': report} for what was loaded.
    """
    report = {}
    name = text_encoder or config.get('text_encoder', 'bert-base-uncased')
    if config.get('load_text_weights', True):
        report['text_encoder'] = load_bert_weights(model.text_encoder, name)
        if hasattr(model, 'text_decoder'):
            report['text_decoder'] = load_bert_weights(model.text_decoder, config.get('text_decoder') or name)
    vision = config.get('vision_pretrained')
    if vision:
        report['visual_encoder'] = load_vision_weights(model.visual_encoder, vision)
    return report
