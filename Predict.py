"""Grad-CAM of a caption on images: which image regions make ALBEF's ITM head say "match", per word (spec 14).

    python Predict.py --checkpoint refcoco.pth --image examples/dog.jpg --caption "a dog on the grass" --out out.png
    python Predict.py --config configs/toy/Grounding.yaml --checkpoint output/toy_grounding/checkpoint_best.pth \
        --image data/toyworld/images/toy_001350.jpg --caption "the red circle" --out toy_gradcam.png

Writes a PNG grid per image: the image, the whole-caption heat map, one heat map per word (word pieces merged),
each titled, and prints the ITM match probability. Checkpoints: the released flat refcoco.pth (384 px, bert-base;
default config configs/Grounding.yaml, the tokenizer from --text_encoder or 'bert-base-uncased'), or our own
checkpoints ({'model': ..., 'config': ...}), whose embedded config is used when --config is not given.
In Python: `p = Predictor('ckpt.pth'); for path in paths: p.save(p.predict(path, caption)[0], out)`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

import utils
from evaluation import gradcam

DEFAULT_CONFIG = 'configs/Grounding.yaml'
TITLE_H = 26  # pixels of the title band above each tile
PAD = 6       # pixels between tiles


@dataclass
class Prediction:
    """Grad-CAM of one image for one caption."""
    image_path: str
    image: np.ndarray          # original RGB uint8 [H, W, 3]
    caption: str               # the normalised caption that was scored
    itm_prob: float            # P(match) of the ITM head
    sentence_map: np.ndarray   # [gh, gw]
    words: list[str]           # words (word pieces merged)
    word_maps: np.ndarray      # [n_words, gh, gw]


class Predictor:
    """Load a checkpoint once, then explain many (image, caption) pairs with ITM Grad-CAM."""

    def __init__(self, checkpoint: str, config: str | dict | None = None, device: str | None = None,
                 block_num: int | None = None, text_encoder: str | None = None, unsafe_load: bool = False):
        import engine
        import models
        from dataset.transforms import build_transform
        from models.checkpoint import load_checkpoint, read_checkpoint
        obj = read_checkpoint(checkpoint, allow_pickle=unsafe_load)
        if isinstance(config, dict):
            self.config = dict(config)
        elif config:
            self.config = utils.load_config(config)
        elif isinstance(obj, dict) and isinstance(obj.get('config'), dict):
            self.config = dict(obj['config'])  # our checkpoints carry the config they were trained with
        else:
            self.config = utils.load_config(DEFAULT_CONFIG)
        if text_encoder:
            self.config['text_encoder'] = text_encoder
        for key in ('image_res', 'bert_config'):
            if key not in self.config:
                raise utils.ConfigError(f"Predict: the config lacks '{key}'; pass --config")
        name = self.config.get('text_encoder', 'bert-base-uncased')
        try:
            self.tokenizer = engine.build_tokenizer(self.config)
        except OSError as e:
            raise utils.UserError(f"cannot load the tokenizer '{name}' ({str(e).splitlines()[0][:120]}); pass "
                                  f"--text_encoder with a local folder holding vocab.txt") from None
        self.device = utils.resolve_device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        model = models.create_model('grounding', self.config, self.tokenizer)
        load_checkpoint(model, obj, 'grounding', allow_pickle=unsafe_load)
        model.eval().to(self.device)
        for p in model.parameters():  # Grad-CAM differentiates w.r.t. attention maps only
            p.requires_grad_(False)
        self.model = model
        self.block_num = gradcam.check_block_num(model, 'itm', block_num)
        self.transform = build_transform('test', self.config['image_res'])

    def predict(self, images: str | Sequence[str], caption: str, batch_size: int = 8) -> list[Prediction]:
        """Grad-CAM of `caption` on each image path; one Prediction per image, in order."""
        from dataset.utils import open_image_rgb, pre_caption
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if not isinstance(caption, str) or not pre_caption(caption, 30):
            raise utils.UserError(f'--caption is empty (after normalisation): {caption!r}')
        text = pre_caption(caption, 30)
        max_len = int(self.model.text_encoder.config.max_position_embeddings)
        tok = self.tokenizer(text, truncation=True, max_length=max_len, return_tensors='pt')
        tokens = self.tokenizer.convert_ids_to_tokens(tok.input_ids[0].tolist())
        out = []
        for start in range(0, len(paths), batch_size):
            chunk = [os.fspath(p) for p in paths[start:start + batch_size]]
            pil = [open_image_rgb(p, '--image') for p in chunk]
            batch = torch.stack([self.transform(im) for im in pil]).to(self.device)
            n = len(chunk)
            res = gradcam.itm_gradcam(self.model, batch, tok.input_ids.repeat(n, 1).to(self.device),
                                      tok.attention_mask.repeat(n, 1).to(self.device), self.block_num)
            for k in range(n):
                words, word_maps = gradcam.merge_word_pieces(tokens, res.token_maps[k])
                out.append(Prediction(chunk[k], np.asarray(pil[k]), text, float(res.itm_prob[k]),
                                      res.sentence_maps[k], words, word_maps))
        return out

    @staticmethod
    def save(pred: Prediction, out_path: str, tile_size: int = 256, cols: int = 4) -> tuple[int, int]:
        """Write the PNG grid of `pred` to out_path; returns its (height, width)."""
        import cv2
        grid = render_grid(pred, tile_size, cols)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if not cv2.imwrite(out_path, grid[:, :, ::-1]):
            raise utils.UserError(f'--out {out_path}: cannot write the image (extension .png expected)')
        return grid.shape[:2]


# ----------------------------------------------------------------------------------------------------------------
# The grid picture
# ----------------------------------------------------------------------------------------------------------------
def grid_shape(n_tiles: int, image_hw: tuple[int, int], tile_size: int = 256, cols: int = 4) -> tuple[int, int]:
    """(height, width) of the PNG holding `n_tiles` tiles of an image of size image_hw (tile width tile_size,
    aspect ratio kept, a title band above each, PAD pixels around)."""
    cols = max(1, min(cols, n_tiles))
    rows = math.ceil(n_tiles / cols)
    th = max(1, round(tile_size * image_hw[0] / image_hw[1]))
    return rows * (th + TITLE_H) + (rows + 1) * PAD, cols * tile_size + (cols + 1) * PAD


def _titled(tile: np.ndarray, title: str) -> np.ndarray:
    import cv2
    band = np.full((TITLE_H, tile.shape[1], 3), 255, np.uint8)
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
    while len(title) > 1 and cv2.getTextSize(title, font, scale, thick)[0][0] > tile.shape[1] - 6:
        title = title[:-2] + '~'  # shorten until it fits, marking the cut
    (tw, th), _ = cv2.getTextSize(title, font, scale, thick)
    cv2.putText(band, title, (max(3, (tile.shape[1] - tw) // 2), (TITLE_H + th) // 2), font, scale, (0, 0, 0), thick,
                cv2.LINE_AA)
    return np.concatenate([band, tile], axis=0)


def render_grid(pred: Prediction, tile_size: int = 256, cols: int = 4) -> np.ndarray:
    """RGB uint8 grid: image, whole-caption overlay, one overlay per word, each with a title."""
    import cv2
    h, w = pred.image.shape[:2]
    th = max(1, round(tile_size * h / w))
    tiles = [(pred.image, 'image'),
             (gradcam.overlay(pred.image, pred.sentence_map), f'caption (p_match {pred.itm_prob:.2f})')]
    tiles += [(gradcam.overlay(pred.image, m), word) for word, m in zip(pred.words, pred.word_maps)]
    H, W = grid_shape(len(tiles), (h, w), tile_size, cols)
    cols = max(1, min(cols, len(tiles)))
    canvas = np.full((H, W, 3), 255, np.uint8)
    for i, (img, title) in enumerate(tiles):
        r, c = divmod(i, cols)
        tile = _titled(cv2.resize(img, (tile_size, th), interpolation=cv2.INTER_AREA), title)
        y, x = PAD + r * (th + TITLE_H + PAD), PAD + c * (tile_size + PAD)
        canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser('ALBEF Grad-CAM prediction')
    p.add_argument('--checkpoint', required=True, help='refcoco.pth (flat) or one of our checkpoints')
    p.add_argument('--config', default=None,
                   help=f"model config (default: the checkpoint's own config, else {DEFAULT_CONFIG})")
    p.add_argument('--image', required=True, nargs='+', help='one or more image files')
    p.add_argument('--caption', required=True)
    p.add_argument('--out', default='gradcam.png',
                   help='output PNG; with several images, <stem>_<k>.png for the k-th image')
    p.add_argument('--block_num', default=None, type=int,
                   help='fusion (BERT) layer to explain (default: fusion_layer + 2, the last fusion layer if fewer)')
    p.add_argument('--text_encoder', default=None, help='tokenizer folder or hub name (default: from config)')
    p.add_argument('--device', default=None, help='default: cuda when available, else cpu')
    p.add_argument('--tile_size', default=256, type=int, help='width of each tile in pixels')
    p.add_argument('--cols', default=4, type=int, help='tiles per row')
    p.add_argument('--unsafe_load', action='store_true', help='allow checkpoints holding pickled code (trusted only)')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


def output_paths(out: str, n: int) -> list[str]:
    """--out for one image; <root>_<k><ext> for k = 0..n-1 with several."""
    if n == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f'{root}_{k}{ext or ".png"}' for k in range(n)]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.tile_size < 16 or args.cols < 1:
        raise utils.UserError('--tile_size must be >= 16 and --cols >= 1')
    # Cheap input checks before the model is loaded (seconds for a full-size checkpoint).
    from dataset.utils import open_image_rgb, pre_caption
    if not pre_caption(args.caption, 30):
        raise utils.UserError(f'--caption is empty (after normalisation): {args.caption!r}')
    for path in args.image:
        open_image_rgb(path, '--image')
    predictor = Predictor(args.checkpoint, args.config, args.device, args.block_num, args.text_encoder,
                          args.unsafe_load)
    preds = predictor.predict(args.image, args.caption)
    for pred, out in zip(preds, output_paths(args.out, len(preds))):
        h, w = predictor.save(pred, out, args.tile_size, args.cols)
        print(f'{pred.image_path}: "{pred.caption}" ITM match probability {pred.itm_prob:.4f}; '
              f'Grad-CAM (fusion layer {predictor.block_num}) -> {out} ({w}x{h})', flush=True)
    return preds


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
