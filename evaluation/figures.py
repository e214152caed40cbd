"""Pictures of Grad-CAM results (OpenCV / numpy): a map over its image, the per-word grid of one image and the
contact sheet of a search.

All are RGB uint8 arrays; `write_png` writes one, refusing anything but a .png path. The maps themselves come
from models/gradcam.py.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from utils import UserError

TITLE_H = 26  # pixels of the title band above each tile
PAD = 6       # pixels between tiles


# ----------------------------------------------------------------------------------------------------------------
# A map over its image
# ----------------------------------------------------------------------------------------------------------------
def _minmax(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    top = a.max()
    return a / top if top > 0 else a


def overlay(image: np.ndarray, heatmap: np.ndarray, blur: bool = True) -> np.ndarray:
    """Jet-coloured heat map blended over an RGB uint8 image [H, W, 3].

    The map (any grid, e.g. [gh, gw]) is min-max normalised, resized bicubically to the image, optionally blurred
    with a Gaussian of sigma 0.02 * max(H, W), normalised again, coloured with the jet colour map and blended with
    weight a**0.7 per pixel (a = normalised map value). Returns RGB uint8 [H, W, 3].
    """
    import cv2
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'overlay: image must be [H, W, 3], got shape {img.shape}')
    h, w = img.shape[:2]
    a = _minmax(np.asarray(heatmap, dtype=np.float32))
    a = cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC)
    if blur:
        a = cv2.GaussianBlur(a, (0, 0), sigmaX=0.02 * max(h, w))
    a = _minmax(np.clip(a, 0, None))  # bicubic overshoot below 0 carries no meaning
    colour = cv2.applyColorMap(np.round(a * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
    weight = (a ** 0.7)[:, :, None]
    out = (1.0 - weight) * img.astype(np.float32) + weight * colour.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def grid_shape(n_tiles: int, image_hw: tuple[int, int], tile_size: int = 256, cols: int = 4) -> tuple[int, int]:
    """(height, width) of the PNG holding `n_tiles` tiles of an image of size image_hw (tile width tile_size,
    aspect ratio kept, a title band above each, PAD pixels around)."""
    cols = max(1, min(cols, n_tiles))
    rows = math.ceil(n_tiles / cols)
    th = max(1, round(tile_size * image_hw[0] / image_hw[1]))
    return rows * (th + TITLE_H) + (rows + 1) * PAD, cols * tile_size + (cols + 1) * PAD


def titled(tile: np.ndarray, title: str) -> np.ndarray:
    """`tile` with a white band above it holding `title` (shortened with '~' until it fits)."""
    import cv2
    band = np.full((TITLE_H, tile.shape[1], 3), 255, np.uint8)
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
    while len(title) > 1 and cv2.getTextSize(title, font, scale, thick)[0][0] > tile.shape[1] - 6:
        title = title[:-2] + '~'
    (tw, th), _ = cv2.getTextSize(title, font, scale, thick)
    cv2.putText(band, title, (max(3, (tile.shape[1] - tw) // 2), (TITLE_H + th) // 2), font, scale, (0, 0, 0), thick,
                cv2.LINE_AA)
    return np.concatenate([band, tile], axis=0)


def tile_grid(tiles: Sequence[tuple[np.ndarray, str]], tile_size: int = 256, cols: int = 4) -> np.ndarray:
    """Titled tiles (RGB images of one aspect ratio, the first one's) laid out row by row on a white canvas."""
    import cv2
    h, w = tiles[0][0].shape[:2]
    th = max(1, round(tile_size * h / w))
    H, W = grid_shape(len(tiles), (h, w), tile_size, cols)
    cols = max(1, min(cols, len(tiles)))
    canvas = np.full((H, W, 3), 255, np.uint8)
    for i, (img, title) in enumerate(tiles):
        r, c = divmod(i, cols)
        tile = titled(cv2.resize(img, (tile_size, th), interpolation=cv2.INTER_AREA), title)
        y, x = PAD + r * (th + TITLE_H + PAD), PAD + c * (tile_size + PAD)
        canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas


def render_grid(cam, tile_size: int = 256, cols: int = 4) -> np.ndarray:
    """One image's Grad-CAM (a models.inference.GradCam): the image, the whole-text overlay, one per word."""
    tiles = [(cam.image, 'image'), (overlay(cam.image, cam.sentence_map), f'caption (p_match {cam.itm_prob:.2f})')]
    tiles += [(overlay(cam.image, m), word) for word, m in zip(cam.words, cam.word_maps)]
    return tile_grid(tiles, tile_size, cols)


def contact_sheet(cams: Sequence, titles: Sequence[str], tile_size: int = 256, cols: int = 5) -> np.ndarray:
    """Search hits side by side: each image with its whole-query Grad-CAM overlaid, under its title. Images of
    other aspect ratios are letterboxed into the first one's shape."""
    import cv2
    h, w = cams[0].image.shape[:2]
    tiles = []
    for cam, title in zip(cams, titles):
        img = overlay(cam.image, cam.sentence_map)
        if img.shape[:2] != (h, w):
            scale = min(h / img.shape[0], w / img.shape[1])
            nh, nw = max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale))
            box = np.full((h, w, 3), 255, np.uint8)
            y, x = (h - nh) // 2, (w - nw) // 2
            box[y:y + nh, x:x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            img = box
        tiles.append((img, title))
    return tile_grid(tiles, tile_size, cols)


def write_png(picture: np.ndarray, path: str, where: str = '--out') -> None:
    """Write an RGB uint8 picture as PNG (the folder is created); a path not ending in .png is refused."""
    import cv2
    if not path.lower().endswith('.png'):
        raise UserError(f'{where} {path}: the picture is written as PNG; give a path ending in .png')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(picture[:, :, ::-1])):
        raise UserError(f'{where} {path}: cannot write the image')
