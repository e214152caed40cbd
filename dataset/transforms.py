"""Image transforms of spec 4.4 (CLIP normalisation, bicubic resizing, RandomAugment on training images)."""
from __future__ import annotations

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


def random_augment() -> RandomAugment:
    """RandomAugment(2, 7, isPIL=True) over the 10 ops every training transform uses."""
    return RandomAugment(2, 7, isPIL=True, augs=list(DEFAULT_AUGS))


def build_transform(kind: str, image_res: int) -> transforms.Compose:
    """The transform `kind` at resolution `image_res` (spec 4.4).

    pretrain: RandomResizedCrop(scale 0.2-1) -> flip -> RandomAugment -> ToTensor -> Normalize.
    train: the same with scale 0.5-1 (retrieval, VQA, NLVR2, VE training).
    test: Resize to exactly (R, R) (aspect ratio not kept) -> ToTensor -> Normalize.
    grounding_train: Resize (R, R) -> flip -> RandomAugment -> ToTensor -> Normalize (no crop).
    All resizes are bicubic. RandomAugment returns a uint8 numpy array that ToTensor scales to [0, 1].
    """
    if isinstance(image_res, bool) or not isinstance(image_res, int) or image_res <= 0:
        raise ValueError(f'image_res must be a positive int, got {image_res!r}')
    bicubic = InterpolationMode.BICUBIC
    if kind in ('pretrain', 'train'):
        scale = (0.2, 1.0) if kind == 'pretrain' else (0.5, 1.0)
        return transforms.Compose([
            transforms.RandomResizedCrop(image_res, scale=scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
            random_augment(),
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
            transforms.RandomHorizontalFlip(),
            random_augment(),
            transforms.ToTensor(),
            normalize(),
        ])
    raise ValueError(f'unknown transform kind {kind!r}; expected one of {", ".join(KINDS)}')
