"""Image transforms of the original ALBEF (CLIP normalisation, bicubic resizing, RandomAugment on training images)."""
from __future__ import annotations

from typing import Mapping

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, OPS, RandomAugment
from utils.config import register_block
from utils.errors import ConfigError
from utils.schema import ANY, Spec, suggest

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


def _check_augment(path: str, block: Mapping) -> None:
    """Value checks of the config's `augment:` block beyond the types of AUGMENT_SCHEMA."""
    scale = block.get('crop_min_scale', 0.5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ConfigError(f"{path}: key 'augment.crop_min_scale' must be a number in (0, 1], got {scale!r}")
    ops = block.get('randaug_ops', [])
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise ConfigError(f"{path}: key 'augment.randaug_ops' must be a list of op names, got {ops!r}")
    for op in ops:
        if op not in OPS:
            raise ConfigError(f"{path}: key 'augment.randaug_ops' names an unknown op '{op}'{suggest(op, OPS)}; "
                              f"known ops: {', '.join(OPS)}")


# The config's optional `augment:` block (see build_transform). crop_min_scale and randaug_ops keep their own
# messages (_check_augment).
AUGMENT_SCHEMA: dict[str, Spec] = {'crop_min_scale': ANY, 'hflip': Spec((bool,)), 'randaug_ops': ANY}
AUGMENT_KEYS = set(AUGMENT_SCHEMA)
register_block('augment', AUGMENT_SCHEMA, _check_augment)


def build_transform(kind: str, image_res: int, augment: dict | None = None) -> transforms.Compose:
    """The transform `kind` at resolution `image_res`, as the original ALBEF builds it.

    pretrain: RandomResizedCrop(scale 0.2-1) -> flip -> RandomAugment -> ToTensor -> Normalize.
    train: the same with scale 0.5-1 (retrieval, VQA, NLVR2, VE training).
    test: Resize to exactly (R, R) (aspect ratio not kept) -> ToTensor -> Normalize.
    grounding_train: Resize (R, R) -> flip -> RandomAugment -> ToTensor -> Normalize (no crop).
    All resizes are bicubic. RandomAugment returns a uint8 numpy array that ToTensor scales to [0, 1].

    `augment` (the config's optional `augment:` block) adapts the training transforms to data whose text the
    original augmentation would falsify: `crop_min_scale` (a crop can cut out counted objects), `hflip`
    (flips swap left and right: False for none), `randaug_ops` (colour ops change colour words). Defaults are the
    original's.
    """
    if isinstance(image_res, bool) or not isinstance(image_res, int) or image_res <= 0:
        raise ValueError(f'image_res must be a positive int, got {image_res!r}')
    augment = augment or {}
    unknown = set(augment) - AUGMENT_KEYS
    if unknown:
        raise ValueError(f'unknown augment key(s) {sorted(unknown)}; expected {sorted(AUGMENT_KEYS)}')
    flip = [transforms.RandomHorizontalFlip()] if augment.get('hflip', True) else []
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
