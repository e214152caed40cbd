"""ALBEF for users: load any checkpoint in one call, then embed, score, explain and answer.

    from models import load_model
    model = load_model('mscoco.pth', text_encoder='bert-base-uncased')     # path or URL; released or ours
    sims = model.similarity(['dog.jpg', 'cat.jpg'], ['a dog on the grass', 'a cat on a sofa'])  # [2, 2] cosine
    p = model.itm_score('dog.jpg', 'a dog on the grass')                     # P(match) from the ITM head
    cam = model.gradcam('dog.jpg', 'a dog on the grass')                     # whole-text and per-word maps

`load_model` reads the checkpoint once (released flat files, wrapped training checkpoints, URLs: downloaded once
into torch.hub's cache with a progress bar), decides which model it fits from its keys, and builds that model for
inference: the online encoders only, without the momentum copies, feature queues and optimizer state a training
run holds. Pretraining, retrieval and grounding checkpoints give an image-text model (embeddings, ITM, Grad-CAM);
a VQA checkpoint answers questions; SNLI-VE and NLVR2 checkpoints classify; the text-assignment checkpoint
(pretrain_model_nlvr.pth) embeds images.

The config: our checkpoints carry the one they were trained with; a released file gets the original config of
its kind (configs/*.yaml) at the image resolution its position embedding was trained at. `config=` overrides
either, `text_encoder=` names the tokenizer (a local folder with vocab.txt where the hub is out of reach).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# dataset, optim and scheduler declare the checks of their config blocks when imported: an embedded config is
# checked in full.
import dataset  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from dataset.transforms import MEAN, STD, build_transform
from dataset.utils import open_image_rgb, pre_caption, pre_question
from models import gradcam
from utils import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Which inference model a checkpoint kind (models.checkpoint.detect_kind) is loaded into.
INFERENCE_TASK = {'pretrain': 'retrieval', 'retrieval': 'retrieval', 'vqa': 'vqa', 've': 've', 'nlvr': 'nlvr',
                  'pretrain_nlvr': 'pretrain_nlvr'}
# The original config of each kind, used for checkpoints that carry none (the released files).
DEFAULT_CONFIGS = {'pretrain': 'configs/Pretrain.yaml', 'retrieval': 'configs/Retrieval_coco.yaml',
                   'vqa': 'configs/VQA.yaml', 've': 'configs/VE.yaml', 'nlvr': 'configs/NLVR.yaml',
                   'pretrain_nlvr': 'configs/NLVR_pretrain.yaml'}
# What each inference model can do (the methods below refuse the rest with a one-line error).
CAPABILITIES = {
    'retrieval': ('embed_images', 'embed_texts', 'similarity', 'itm_score', 'gradcam'),
    'vqa': ('answer', 'answer_scores'),
    've': ('classify',),
    'nlvr': ('classify',),
    'pretrain_nlvr': ('embed_images',),
}
CLASS_NAMES = {'ve': ('contradiction', 'neutral', 'entailment'), 'nlvr': ('false', 'true')}
PRECISIONS = ('fp32', 'bf16', 'fp16')


@dataclass
class GradCam:
    """Grad-CAM of one image for one text (ITM, on a fusion layer's cross-attention).

    image: the RGB uint8 image [H, W, 3] as given; text: the normalised text that was scored; itm_prob: P(match);
    sentence_map: [gh, gw] on the model's patch grid; words / word_maps [n_words, gh, gw]: one map per word
    (word pieces merged); block_num: the fusion layer explained; image_path: the file, when one was given.
    """
    image: np.ndarray
    text: str
    itm_prob: float
    sentence_map: np.ndarray
    words: list[str]
    word_maps: np.ndarray
    block_num: int
    image_path: str | None = None

    @property
    def caption(self) -> str:
        return self.text


def default_config(kind: str, source: str) -> str:
    """The original config for a checkpoint of `kind` without one (refcoco / flickr files by their names)."""
    name = os.path.basename(source).lower()
    if kind == 'retrieval' and 'refcoco' in name:
        return 'configs/Grounding.yaml'
    if kind == 'retrieval' and 'flickr' in name:
        return 'configs/Retrieval_flickr.yaml'
    return DEFAULT_CONFIGS[kind]


def _kind_and_config(obj, source: str, config, text_encoder, image_res):
    """(checkpoint kind, resolved config dict) for a read checkpoint object."""
    from models.checkpoint import detect_kind, unwrap_state_dict
    sd, _ = unwrap_state_dict(obj, source)
    kind = detect_kind(sd)
    if isinstance(config, dict):
        cfg = dict(config)
        utils.validate_config(cfg, '<config dict>')
    elif config:
        cfg = utils.load_config(os.fspath(config))
    elif isinstance(obj, dict) and isinstance(obj.get('config'), dict):
        cfg = dict(obj['config'])  # our checkpoints carry the config they were trained with
        utils.validate_config(cfg, f'{source} (its embedded config)')
    else:
        cfg = utils.load_config(os.path.join(ROOT, default_config(kind, source)))
        bert = cfg.get('bert_config')
        if isinstance(bert, str) and not os.path.isabs(bert):
            cfg['bert_config'] = os.path.join(ROOT, bert)
        # A released file runs at the resolution it was trained at, read off its position embedding.
        pos = sd.get('visual_encoder.pos_embed')
        if pos is not None and pos.ndim == 3 and image_res is None:
            grid = math.isqrt(pos.shape[1] - 1)
            if grid * grid == pos.shape[1] - 1:
                cfg['image_res'] = grid * int(cfg.get('patch_size', 16))
    cfg['bert_config'] = _find_bert_config(cfg.get('bert_config'))
    if text_encoder:
        cfg['text_encoder'] = os.fspath(text_encoder)
    if image_res is not None:
        cfg['image_res'] = int(image_res)
    for key in ('image_res', 'bert_config'):
        if key not in cfg:
            raise ConfigError(f"load_model: the config lacks '{key}'; pass config=")
    return kind, cfg


def _find_bert_config(bert_config):
    """A checkpoint's config names its BERT config by the path it had where it was trained (often absolute, in
    another checkout): when that file is gone, use the file of the same name in this repository's configs."""
    if not isinstance(bert_config, str) or os.path.isfile(bert_config):
        return bert_config
    name = os.path.basename(bert_config)
    for candidate in (os.path.join(ROOT, bert_config), os.path.join(ROOT, 'configs', name),
                      os.path.join(ROOT, 'configs', 'toy', name)):
        if os.path.isfile(candidate):
            return candidate
    return bert_config  # the model build names the missing file


def _tokenizer(config):
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(config.get('text_encoder', 'bert-base-uncased'))


def load_model(checkpoint, *, config=None, text_encoder: str | None = None, device: str | None = None,
               image_res: int | None = None, precision: str = 'fp32', unsafe_load: bool = False) -> 'InferenceModel':
    """Load an ALBEF checkpoint for inference and return an `InferenceModel` (model, transform, tokenizer).

    checkpoint: a path or http(s) URL (downloaded once into torch.hub's cache, with a progress bar), or an
        in-memory state dict. Every released layout (ALBEF.pth, ALBEF_4M.pth, mscoco.pth, flickr30k.pth,
        refcoco.pth, vqa.pth, pretrain_model_nlvr.pth) and this repository's own checkpoints.
    config: a YAML path or dict; default: the checkpoint's own, else the original config of its kind.
    text_encoder: tokenizer hub name or local folder (overrides the config's `text_encoder`).
    device: 'cpu', 'cuda', 'cuda:1', ... (default: cuda when available). image_res: run at another resolution
        (position embeddings are resampled). precision: fp32, bf16 or fp16 (autocast; fp16 on CUDA only).
    unsafe_load: allow files holding pickled code (trusted files only).
    """
    import models
    from models.checkpoint import load_checkpoint, read_checkpoint
    if precision not in PRECISIONS:
        raise ConfigError(f'load_model: precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    source = checkpoint if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    obj = read_checkpoint(source, allow_pickle=unsafe_load)
    where = '<in-memory dict>' if isinstance(source, dict) else source
    kind, cfg = _kind_and_config(obj, where, config, text_encoder, image_res)
    task = INFERENCE_TASK[kind]
    tokenizer = _tokenizer(cfg)
    model = models.create_model(task, cfg, tokenizer, inference=True)
    load_checkpoint(model, obj, task, allow_pickle=unsafe_load)
    del obj
    dev = utils.resolve_device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if precision == 'fp16' and dev.type != 'cuda':
        raise ConfigError('load_model: precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)')
    model.eval().requires_grad_(False).to(dev)
    return InferenceModel(model, cfg, tokenizer, dev, task=task, kind=kind, precision=precision,
                          source=where if isinstance(where, str) else None)


class InferenceModel:
    """An ALBEF model ready for inference, with its image transform and tokenizer (build it with `load_model`).

    Images may be given as file paths, PIL images, RGB uint8 numpy arrays [H, W, 3], or tensors already
    transformed ([3, R, R] or [B, 3, R, R]); a single item or a list. Texts: a string or a list of strings,
    normalised as the original does (lower case, punctuation dropped, at most `max_words` words).
    """

    def __init__(self, model, config: dict, tokenizer, device: torch.device, *, task: str, kind: str,
                 precision: str = 'fp32', source: str | None = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.task = task
        self.kind = kind
        self.precision = precision
        self.source = source
        self.image_res = int(config['image_res'])
        self.transform = build_transform('test', self.image_res)
        self.max_words = int(config.get('max_words', 30))
        self.max_tokens = int(self._bert_config_value('max_position_embeddings', 512))

    def _bert_config_value(self, name, default):
        enc = getattr(self.model, 'text_encoder', None)
        return getattr(getattr(enc, 'config', None), name, default)

    def __repr__(self):
        return (f'InferenceModel(task={self.task!r}, checkpoint kind={self.kind!r}, image_res={self.image_res}, '
                f'device={str(self.device)!r}, precision={self.precision!r}, can={", ".join(self.capabilities)})')

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The methods this checkpoint supports."""
        return CAPABILITIES[self.task]

    def _require(self, what: str) -> None:
        if what not in self.capabilities:
            raise UserError(f"{what}: a '{self.kind}' checkpoint ({self.source or 'in-memory'}) cannot do this; it "
                            f"supports {', '.join(self.capabilities)}")

    def _autocast(self):
        if self.precision == 'fp32':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == 'bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _as_list(items) -> list:
        if isinstance(items, (str, os.PathLike, np.ndarray)) or not isinstance(items, Iterable):
            return [items]
        if torch.is_tensor(items):
            return [items] if items.ndim == 3 else list(items)
        return list(items)

    def load_image(self, image):
        """(RGB PIL image or None, transformed tensor [3, R, R]) for one image input."""
        from PIL import Image
        if torch.is_tensor(image):
            if image.ndim != 3 or image.shape[0] != 3:
                raise UserError(f'image tensor must be [3, R, R] (already transformed), got {tuple(image.shape)}')
            return None, image
        if isinstance(image, (str, os.PathLike)):
            pil = open_image_rgb(os.fspath(image), 'image')
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise UserError(f'image array must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}')
            pil = Image.fromarray(image)
        elif isinstance(image, Image.Image):
            pil = image.convert('RGB')
        else:
            raise UserError(f'image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}')
        return pil, self.transform(pil)

    def image_batches(self, images, batch_size: int, progress: bool = False):
        """Yield transformed image batches [b, 3, R, R] on the device."""
        items = self._as_list(images)
        starts = range(0, len(items), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, total=len(starts), desc='embedding images', unit='batch')
        for start in starts:
            yield torch.stack([self.load_image(x)[1] for x in items[start:start + batch_size]]).to(self.device)

    def normalise_text(self, text: str, where: str = 'text') -> str:
        """The text as the model reads it (lower case, no punctuation, at most max_words words)."""
        if not isinstance(text, str):
            raise UserError(f'{where} must be a string, got {type(text).__name__}')
        out = pre_caption(text, self.max_words)
        if not out.strip():
            raise UserError(f'{where} is empty after normalisation: {text!r}')
        return out

    def tokenize(self, texts: Sequence[str], where: str = 'text'):
        """Token ids and attention mask [N, L] on the device for normalised copies of `texts`."""
        normalised = [self.normalise_text(t, where) for t in texts]
        tok = self.tokenizer(normalised, padding='longest', truncation=True, max_length=self.max_tokens,
                             return_tensors='pt')
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    # ---------------------------------------------------------------------------------------------------------
    # Embeddings and scores
    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """L2-normalised image features [N, D] (float32, CPU) in the shared image-text space."""
        self._require('embed_images')
        feats = []
        for batch in self.image_batches(images, batch_size, progress):
            with self._autocast():
                embeds = self.model.visual_encoder(batch)
                feats.append(F.normalize(self.model.vision_proj(embeds[:, 0, :]).float(), dim=-1).cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.model.vision_proj.out_features)

    @torch.no_grad()
    def embed_texts(self, texts, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features [M, D] (float32, CPU) in the shared image-text space."""
        self._require('embed_texts')
        texts = [texts] if isinstance(texts, str) else list(texts)
        feats = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[start:start + batch_size])
            with self._autocast():
                _, feat = self.model.encode_text(ids, mask)
            feats.append(feat.float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.model.text_proj.out_features)

    def similarity(self, images, texts) -> torch.Tensor:
        """Cosine similarity [N images, M texts] of the ITC features (divide by `model.temp` for logits)."""
        self._require('similarity')
        return self.embed_images(images) @ self.embed_texts(texts).t()

    @torch.no_grad()
    def itm_score(self, images, texts, batch_size: int = 32) -> torch.Tensor:
        """P(match) [N] of the ITM head for the pairs (images[i], texts[i]); one image or one text is paired
        with every entry of the other list."""
        self._require('itm_score')
        images, texts = self._as_list(images), [texts] if isinstance(texts, str) else list(texts)
        n = max(len(images), len(texts))
        if len(images) not in (1, n) or len(texts) not in (1, n):
            raise UserError(f'itm_score: {len(images)} images and {len(texts)} texts cannot be paired (give equal '
                            f'numbers, or one of either)')
        out = []
        image_embeds = None
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if len(images) > 1 or image_embeds is None:
                chunk = images[start:stop] if len(images) > 1 else images
                batch = torch.stack([self.load_image(x)[1] for x in chunk]).to(self.device)
                with self._autocast():
                    image_embeds = self.model.visual_encoder(batch)
            ids, mask = self.tokenize(texts[start:stop] if len(texts) > 1 else texts * (stop - start))
            with self._autocast():
                text_embeds, _ = self.model.encode_text(ids, mask)
                embeds = image_embeds if image_embeds.size(0) == stop - start else \
                    image_embeds.expand(stop - start, -1, -1)
                logits = self.model.itm_logits(text_embeds, mask, embeds)
            out.append(F.softmax(logits.float(), dim=1)[:, 1].cpu())
        return torch.cat(out)

    # ---------------------------------------------------------------------------------------------------------
    # Grad-CAM
    # ---------------------------------------------------------------------------------------------------------
    def gradcam(self, image, text: str, block_num: int | None = None) -> GradCam:
        """Which image regions make the ITM head say "match" for `text`: the whole-text map and one per word."""
        return self.gradcam_batch([image], text, block_num)[0]

    def gradcam_batch(self, images, text: str, block_num: int | None = None, batch_size: int = 8) -> list[GradCam]:
        """`gradcam` for several images and one text; one GradCam per image, in order."""
        self._require('gradcam')
        block_num = gradcam.check_block_num(self.model, 'itm', block_num)
        normalised = self.normalise_text(text)
        ids, mask = self.tokenize([text])
        tokens = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        items = self._as_list(images)
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            loaded = [self.load_image(x) for x in chunk]
            batch = torch.stack([t for _, t in loaded]).to(self.device)
            n = len(chunk)
            with self._autocast():
                res = gradcam.itm_gradcam(self.model, batch, ids.repeat(n, 1), mask.repeat(n, 1), block_num)
            for k, (pil, tensor) in enumerate(loaded):
                words, word_maps = gradcam.merge_word_pieces(tokens, res.token_maps[k])
                picture = np.asarray(pil) if pil is not None else _denormalise(tensor)
                path = os.fspath(chunk[k]) if isinstance(chunk[k], (str, os.PathLike)) else None
                out.append(GradCam(picture, normalised, float(res.itm_prob[k]), res.sentence_maps[k], words,
                                   word_maps, block_num, path))
        return out

    # ---------------------------------------------------------------------------------------------------------
    # VQA
    # ---------------------------------------------------------------------------------------------------------
    def answer(self, image, question: str, answer_list, k: int = 128) -> str:
        """The best answer to `question` about `image` from `answer_list` (a list of strings or the path of a JSON
        list, e.g. the original's answer_list.json)."""
        return self.answer_scores(image, question, answer_list, k=k, top=1)[0][0]

    @torch.no_grad()
    def answer_scores(self, image, question: str, answer_list, k: int = 128, top: int = 5) -> list[tuple[str, float]]:
        """The `top` answers with their probabilities (over the k candidates re-ranked, as the original ranks)."""
        self._require('answer')
        answers = _read_answer_list(answer_list)
        # Normalised as VQA.py's test questions are (at most 50 words).
        text = pre_question(question, 50).strip() if isinstance(question, str) else ''
        if not text:
            raise UserError(f'question is empty after normalisation: {question!r}')
        q = self.tokenizer([text], padding='longest', truncation=True, max_length=self.max_tokens,
                           return_tensors='pt')
        eos = self.config.get('eos', '[SEP]')
        cand = self.tokenizer([a + eos for a in answers], padding='longest', return_tensors='pt')
        batch = self.load_image(image)[1][None].to(self.device)
        with self._autocast():
            ids, probs = self.model.predict(batch, q.input_ids.to(self.device), q.attention_mask.to(self.device),
                                            cand.input_ids.to(self.device), cand.attention_mask.to(self.device),
                                            min(k, len(answers)))
        order = probs[0].float().argsort(descending=True)[:top]
        return [(answers[int(ids[0, j])], float(probs[0, j])) for j in order]

    # ---------------------------------------------------------------------------------------------------------
    # SNLI-VE and NLVR2
    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, image, text: str) -> dict[str, float]:
        """Class probabilities: SNLI-VE (image, hypothesis) -> contradiction / neutral / entailment; NLVR2
        ((left image, right image), sentence) -> false / true."""
        self._require('classify')
        ids, mask = self.tokenize([text])
        if self.task == 'nlvr':
            pair = self._as_list(image)
            if len(pair) != 2:
                raise UserError(f'classify: an NLVR2 checkpoint needs a pair of images, got {len(pair)}')
            batch = torch.stack([self.load_image(x)[1] for x in pair]).to(self.device)
        else:
            batch = self.load_image(image)[1][None].to(self.device)
        with self._autocast():
            logits = self.model.predict(batch, ids, mask)
        probs = F.softmax(logits.float(), dim=1)[0].tolist()
        return dict(zip(CLASS_NAMES[self.task], probs))


def _read_answer_list(answer_list) -> list[str]:
    import json
    if isinstance(answer_list, (str, os.PathLike)):
        path = os.fspath(answer_list)
        try:
            with open(path, encoding='utf-8') as f:
                answer_list = json.load(f)
        except OSError as e:
            raise UserError(f'answer_list {path}: cannot read ({e.strerror or e})') from None
        except ValueError as e:
            raise UserError(f'answer_list {path}: not valid JSON ({e})') from None
    answers = list(answer_list) if not isinstance(answer_list, str) else []
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise UserError('answer_list must be a non-empty list of non-empty strings')
    return answers


def _denormalise(tensor: torch.Tensor) -> np.ndarray:
    """A transformed image tensor [3, R, R] back to RGB uint8 [R, R, 3] (for pictures of tensor inputs)."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    img = (tensor.detach().float().cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
