"""RandomAugment as in the original: N ops drawn with replacement, each applied with probability 0.5 at magnitude M.

Ops work on uint8 numpy arrays (H x W x C, RGB, or H x W) and are implemented with OpenCV lookup tables and
warpAffine, which is several times faster than PIL for the same operations (see benchmarks/data_pipeline.py).
All randomness comes from numpy's global RNG in the documented order: `np.random.choice` for the N op names,
then per op one `np.random.random()` for the 0.5 application test and, only for applied Rotate/Shear/Translate,
one more for the sign.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import cv2
import numpy as np

MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _check(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise TypeError('RandomAugment ops expect a uint8 numpy array of shape HxW or HxWxC, got '
                        f'{type(img).__name__} {getattr(img, "dtype", "")} {getattr(img, "shape", "")}')
    return np.ascontiguousarray(img)


def _apply_lut(img: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Map img through a (256,) table or per-channel (256, C) tables (uint8)."""
    tables = np.ascontiguousarray(tables, dtype=np.uint8)
    if tables.ndim == 1 or img.ndim == 2:
        return cv2.LUT(img, tables.reshape(256) if tables.ndim == 1 else tables[:, 0])
    c = img.shape[2]
    if c > 4:  # cv2.LUT limits; never hit for RGB
        return np.stack([tables[:, k][img[..., k]] for k in range(c)], axis=2)
    out = cv2.LUT(img, tables.reshape(256, 1, c))
    return out.reshape(img.shape)


def _channel_minmax(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Per-plane minMaxLoc is ~25x faster than numpy's strided min/max over axis 0 of an (H*W, C) view.
    planes = [img] if img.ndim == 2 else cv2.split(img)
    lo, hi = zip(*(cv2.minMaxLoc(p)[:2] for p in planes))
    return np.array(lo), np.array(hi)


def _fill_for(img: np.ndarray, fill) -> tuple:
    c = 1 if img.ndim == 2 else img.shape[2]
    fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * c
    return fill[:c] if c <= 4 else fill


def _warp(img: np.ndarray, matrix: np.ndarray, fill) -> np.ndarray:
    h, w = img.shape[:2]
    out = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=_fill_for(img, fill))
    return out.reshape(img.shape)  # warpAffine drops a trailing singleton channel


# ----------------------------------------------------------------------------------------------------------------
# The 14 ops
# ----------------------------------------------------------------------------------------------------------------
def identity(img: np.ndarray) -> np.ndarray:
    """Return the image unchanged."""
    return img


def auto_contrast(img: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255]: v -> (v - lo) * 255 / (hi - lo), truncated (cutoff 0).

    A channel with hi <= lo is left unchanged.
    """
    img = _check(img)
    lo, hi = _channel_minmax(img)
    v = np.arange(256, dtype=np.float64)[:, None]
    lo_f, hi_f = lo.astype(np.float64), hi.astype(np.float64)
    span = np.where(hi_f > lo_f, hi_f - lo_f, 1.0)
    tables = np.clip((v - lo_f) * 255.0 / span, 0, 255).astype(np.uint8)
    tables = np.where(hi_f > lo_f, tables, v.astype(np.uint8))  # flat channels: identity table
    return _apply_lut(img, tables)


def _equalize_table(hist: np.ndarray) -> np.ndarray | None:
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
        return None
    n = np.empty(256, dtype=np.int64)
    n[0] = step // 2
    n[1:] = hist[:-1]
    return np.clip(np.cumsum(n) // step, 0, 255).astype(np.uint8)


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation per channel with PIL's ImageOps.equalize algorithm (not OpenCV's).

    step = floor((number of pixels outside the last non-empty bin) / 255); step 0 -> channel unchanged; table =
    floor(cumsum(n) / step) with n[0] = floor(step / 2), n[i] = hist[i-1], clipped to [0, 255].
    """
    img = _check(img)
    c = 1 if img.ndim == 2 else img.shape[2]
    tables = np.empty((256, c), dtype=np.uint8)
    ident = np.arange(256, dtype=np.uint8)
    for k in range(c):
        # calcHist reads channel k of the interleaved image directly (no per-channel copy).
        hist = cv2.calcHist([img], [k], None, [256], [0, 256]).reshape(256)
        table = _equalize_table(hist.astype(np.int64))
        tables[:, k] = ident if table is None else table
    return _apply_lut(img, tables)


def rotate(img: np.ndarray, degree: float, fill=(0, 0, 0)) -> np.ndarray:
    """Rotate by `degree` (positive = counter-clockwise) about (W/2, H/2), bilinear, same size, fill colour."""
    img = _check(img)
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degree, 1)
    return _warp(img, m, fill)


def solarize(img: np.ndarray, thresh: int = 128) -> np.ndarray:
    """Invert values >= thresh: v < thresh ? v : 255 - v."""
    v = np.arange(256)
    return _apply_lut(_check(img), np.where(v < thresh, v, 255 - v).astype(np.uint8))


def color(img: np.ndarray, factor: float) -> np.ndarray:
    """Saturation: blend with the grey image g = 0.114 c0 + 0.587 c1 + 0.299 c2 by `factor` (clip, truncate).

    Written as one 3x3 colour matrix (out = img @ M with M = factor * (I - w 1^T) + w 1^T). The weights are BGR
    luma weights although images are RGB (as in the original; the op is not used by the training scripts).
    """
    img = _check(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError('Color needs a 3-channel image')
    w = np.float32([[0.114], [0.587], [0.299]])
    m = (np.eye(3, dtype=np.float32) - w) * np.float32(factor) + w
    return np.clip(np.matmul(img, m), 0, 255).astype(np.uint8)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend every value with the mean luminance (weights 0.114, 0.587, 0.299 on channels 0, 1, 2)."""
    img = _check(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError('Contrast needs a 3-channel image')
    # cv2.mean sums the uint8 values exactly, like numpy, but ~100x faster than a strided numpy mean.
    mean = float(np.sum(np.array(cv2.mean(img)[:3]) * np.array([0.114, 0.587, 0.299])))
    table = (np.arange(256, dtype=np.float64) - mean) * factor + mean
    return _apply_lut(img, np.clip(table, 0, 255).astype(np.uint8))


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """v -> clip(v * factor, 0, 255) truncated to uint8 (the product is taken in float32)."""
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return _apply_lut(_check(img), table)


_SHARP_KERNEL = np.ones((3, 3), dtype=np.float32)
_SHARP_KERNEL[1, 1] = 5
_SHARP_KERNEL /= 13


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy (3x3 kernel of ones, centre 5, /13; OpenCV default border, rounded to uint8).

    factor 0 -> smoothed image, 1 -> original; otherwise only interior pixels (the 1-pixel border keeps the
    original values) become smoothed + factor * (img - smoothed) in float32, converted to uint8 WITHOUT clipping
    (like the original): values are truncated toward zero and wrap modulo 256, which is what the original's
    float32 -> uint8 cast does on x86 (written out here so the result does not depend on the platform).
    """
    img = _check(img)
    degenerate = cv2.filter2D(img, -1, _SHARP_KERNEL).reshape(img.shape)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    h, w = img.shape[:2]
    out = img.copy()
    if h <= 2 or w <= 2:
        return out
    inner = (slice(1, -1), slice(1, -1))
    d = degenerate[inner].astype(np.float32)
    blended = d + np.float32(factor) * (img[inner].astype(np.float32) - d)
    out[inner] = blended.astype(np.int32).astype(np.uint8)
    return out


def shear_x(img: np.ndarray, factor: float, fill=(0, 0, 0)) -> np.ndarray:
    """Forward affine map [[1, factor, 0], [0, 1, 0]]: output(x + factor*y, y) = input(x, y); bilinear, fill."""
    img = _check(img)
    return _warp(img, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(img: np.ndarray, factor: float, fill=(0, 0, 0)) -> np.ndarray:
    """Forward affine map [[1, 0, 0], [factor, 1, 0]]; bilinear, fill."""
    img = _check(img)
    return _warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(img: np.ndarray, offset: float, fill=(0, 0, 0)) -> np.ndarray:
    """Shift content left by `offset` pixels (matrix [[1, 0, -offset], [0, 1, 0]]); bilinear, fill."""
    img = _check(img)
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(img: np.ndarray, offset: float, fill=(0, 0, 0)) -> np.ndarray:
    """Shift content up by `offset` pixels (matrix [[1, 0, 0], [0, 1, -offset]]); bilinear, fill."""
    img = _check(img)
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top `bits` bits of every value."""
    mask = (0xFF << (8 - int(bits))) & 0xFF
    return np.bitwise_and(_check(img), np.uint8(mask))


# ----------------------------------------------------------------------------------------------------------------
# Argument generators (level -> args); the sign draws happen only for applied ops
# ----------------------------------------------------------------------------------------------------------------
def _no_args(level):
    return ()


def _enhance_args(level):
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _rotate_args(level):
    angle = (level / MAX_LEVEL) * 30
    if np.random.random() < 0.5:
        angle = -angle
    return (angle, FILL)


def _shear_args(level):
    s = (level / MAX_LEVEL) * 0.3
    if np.random.random() > 0.5:
        s = -s
    return (s, FILL)


def _translate_args(level):
    offset = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
    if np.random.random() > 0.5:
        offset = -offset
    return (offset, FILL)


def _solarize_args(level):
    return (int((level / MAX_LEVEL) * 256),)


def _posterize_args(level):
    return (int((level / MAX_LEVEL) * 4),)


class Op(NamedTuple):
    func: Callable
    level_to_args: Callable


# Registration order = the draw order of `np.random.choice` when augs is empty (the order of the original's op table).
OPS: dict[str, Op] = {
    'Identity': Op(identity, _no_args),
    'AutoContrast': Op(auto_contrast, _no_args),
    'Equalize': Op(equalize, _no_args),
    'Rotate': Op(rotate, _rotate_args),
    'Solarize': Op(solarize, _solarize_args),
    'Color': Op(color, _enhance_args),
    'Contrast': Op(contrast, _enhance_args),
    'Brightness': Op(brightness, _enhance_args),
    'Sharpness': Op(sharpness, _enhance_args),
    'ShearX': Op(shear_x, _shear_args),
    'ShearY': Op(shear_y, _shear_args),
    'TranslateX': Op(translate_x, _translate_args),
    'TranslateY': Op(translate_y, _translate_args),
    'Posterize': Op(posterize, _posterize_args),
}

# The 10 ops every ALBEF training transform uses.
DEFAULT_AUGS = ['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
                'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']


class RandomAugment:
    """Apply N randomly drawn ops (with replacement), each with probability 0.5, at magnitude M.

    Args:
        N: number of ops drawn per call. M: level (0..10 in the original; 7 in the scripts).
        isPIL: the input is a PIL image (converted with np.array); otherwise a uint8 numpy array.
        augs: op names to draw from; empty means all 14 registered ops. Unknown names raise ValueError.
    Returns a uint8 numpy array (H x W x C), which torchvision's ToTensor accepts.
    """

    def __init__(self, N: int = 2, M: float = 10, isPIL: bool = False, augs=()):
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 0:
            raise ValueError(f'RandomAugment: N must be a non-negative int, got {N!r}')
        if isinstance(M, bool) or not isinstance(M, (int, float, np.number)):
            raise ValueError(f'RandomAugment: M must be a number, got {M!r}')
        augs = list(augs) if augs else list(OPS)
        unknown = [a for a in augs if a not in OPS]
        if unknown:
            raise ValueError(f'RandomAugment: unknown op {unknown[0]!r}; known ops: {", ".join(OPS)}')
        self.N = int(N)
        self.M = M
        self.isPIL = isPIL
        self.augs = augs
        self._aug_array = np.array(augs)  # np.random.choice on an array draws exactly as on the list

    def get_random_ops(self) -> list[tuple[str, float, float]]:
        """Draw N (name, probability 0.5, level M) triples with np.random.choice (with replacement)."""
        names = np.random.choice(self._aug_array, self.N)
        return [(str(name), 0.5, self.M) for name in names]

    def __call__(self, img):
        if self.isPIL:
            img = np.array(img)
        elif not isinstance(img, np.ndarray):
            raise TypeError(f'RandomAugment(isPIL=False) expects a numpy array, got {type(img).__name__}; '
                            'pass isPIL=True for PIL images')
        for name, prob, level in self.get_random_ops():
            if np.random.random() > prob:
                continue
            op = OPS[name]
            img = op.func(img, *op.level_to_args(level))
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}(N={self.N}, M={self.M}, isPIL={self.isPIL}, augs={self.augs})'
