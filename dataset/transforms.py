"""Image transforms of spec 4.4 (CLIP normalisation, bicubic resizing, RandomAugment on training images)."""
from __future__ import annotations

import random
import re
from typing import Sequence

from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, RandomAugment

# CLIP statistics, used by every ALBEF transform.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

KINDS = ('pretrain', 'train', 'test', 'grounding_train')


def normalize() -> transforms.Normalize:
    """Normalize with the CLIP mean/std."""
    return transforms.Normalize(MEAN, STD)


def random_augment(ops=None) -> RandomAugment:
    """RandomAugment(2, 7, isPIL=True) over `ops` (default: the 10 ops every original training transform uses)."""
    return RandomAugment(2, 7, isPIL=True, augs=list(DEFAULT_AUGS if ops is None else ops))


AUGMENT_KEYS = {'crop_min_scale', 'hflip', 'randaug_ops'}
SWAP_SIDES = 'swap_sides'  # augment.hflip value: flip in the dataset, with the text's side words swapped

SIDE_SWAPS = {'left': 'right', 'right': 'left', 'leftmost': 'rightmost', 'rightmost': 'leftmost'}
_SIDE_WORD = re.compile(r'\b(leftmost|rightmost|left|right)\b', re.IGNORECASE)


def swap_sides(text: str) -> str:
    """`text` with left <-> right and leftmost <-> rightmost swapped (whole words, first-letter case kept)."""
    def swap(match):
        word = SIDE_SWAPS[match.group(1).lower()]
        return word.capitalize() if match.group(1)[0].isupper() else word
    return _SIDE_WORD.sub(swap, text)


class MirrorSwappingSides:
    """A horizontal flip that keeps the text true: with probability `p` the image is mirrored and every text has
    its side words swapped ("the leftmost circle" -> "the rightmost circle"). The plain flip of the original
    turns such texts false. Draws from Python's `random`, which the training loader seeds per item."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, texts: Sequence[str]) -> tuple[Image.Image, tuple[str, ...]]:
        if random.random() >= self.p:
            return image, tuple(texts)
        return ImageOps.mirror(image), tuple(swap_sides(t) for t in texts)


def side_mirror(augment: dict | None) -> MirrorSwappingSides | None:
    """The dataset-side flip the `augment:` block asks for (`hflip: swap_sides`), else None."""
    return MirrorSwappingSides() if (augment or {}).get('hflip') == SWAP_SIDES else None


def build_transform(kind: str, image_res: int, augment: dict | None = None) -> transforms.Compose:
    """The transform `kind` at resolution `image_res` (spec 4.4).

    pretrain: RandomResizedCrop(scale 0.2-1) -> flip -> RandomAugment -> ToTensor -> Normalize.
    train: the same with scale 0.5-1 (retrieval, VQA, NLVR2, VE training).
    test: Resize to exactly (R, R) (aspect ratio not kept) -> ToTensor -> Normalize.
    grounding_train: Resize (R, R) -> flip -> RandomAugment -> ToTensor -> Normalize (no crop).
    All resizes are bicubic. RandomAugment returns a uint8 numpy array that ToTensor scales to [0, 1].

    `augment` (the config's optional `augment:` block) adapts the training transforms to data whose text the
    original augmentation would falsify: `crop_min_scale` (a crop can cut out counted objects), `hflip`
    (flips swap left and right: False for none, 'swap_sides' to flip in the dataset with the text's side words
    swapped, see `MirrorSwappingSides`; then there is no flip here), `randaug_ops` (colour ops change colour
    words). Defaults are the original's.
    """
    if isinstance(image_res, bool) or not isinstance(image_res, int) or image_res <= 0:
        raise ValueError(f'image_res must be a positive int, got {image_res!r}')
    augment = augment or {}
    unknown = set(augment) - AUGMENT_KEYS
    if unknown:
        raise ValueError(f'unknown augment key(s) {sorted(unknown)}; expected {sorted(AUGMENT_KEYS)}')
    flip = [transforms.RandomHorizontalFlip()] if augment.get('hflip', True) is True else []
    randaug = random_augment(augment.get('randaug_ops'))
    bicubic = InterpolationMode.BICUBIC
    if kind in ('pretrain', 'train'):
        scale = (augment.get('crop_min_scale', 0.2 if kind == 'pretrain' else 0.5), 1.0)
        return transforms.Compose([
            transforms.RandomResizedCrop(image_res, scale=scale, interpolation=bicubic),
            *flip,
            randaug,
            transforms.ToTensor(),
            normalize(),
        ])
    if kind == 'test':
        return transforms.Compose([
            transforms.Resize((image_res, image_res), interpolation=bicubic),
            transforms.ToTensor(),
            normalize(),
        ])
    if kind == 'grounding_train':
        return transforms.Compose([
            transforms.Resize((image_res, image_res), interpolation=bicubic),
            *flip,
            randaug,
            transforms.ToTensor(),
            normalize(),
        ])
    raise ValueError(f'unknown transform kind {kind!r}; expected one of {", ".join(KINDS)}')
