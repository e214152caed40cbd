"""Image-caption datasets: pretraining, retrieval training and retrieval evaluation.

Common keyword-only extras (not in the original): `skip_bad_images` (replace unreadable images by the next
readable item and count them in `num_skipped`, see dataset.utils.ImageDatasetBase) and `allow_absolute_paths`
(image paths that are absolute or contain '..' are refused unless True; the pretraining files use absolute paths
by design, so there the default is True and `image_root` defaults to '').
"""
from __future__ import annotations

import random

from torch.utils.data import Dataset

from dataset.utils import (DataError, ImageDatasetBase, check_visible_text, load_annotations, pre_caption,
                           resolve_image_path)


def _path_checker(image_root: str, allow_absolute: bool, key: str = 'image'):
    """An annotation check that refuses image paths escaping image_root and captions without a visible character
    (run once at construction)."""
    def check(item, where):
        check_visible_text(item['caption'], 'caption', where)
        resolve_image_path(image_root, item[key], allow_absolute, where, check_file_link=False)
    return check


class pretrain_dataset(ImageDatasetBase, Dataset):
    """Pretraining pairs: items {'image': path (opened as given), 'caption': str or list of str}.

    Item: (image tensor, normalised caption). A caption list yields one caption drawn with `random.choice` at
    every access.
    """

    def __init__(self, ann_file, transform, max_words: int = 30, *, image_root: str = '',
                 allow_absolute_paths: bool = True, skip_bad_images: bool = False):
        def check(item, where):
            if isinstance(item['caption'], list) and not item['caption']:
                raise DataError(f'{where}: key \'caption\' is an empty list')
            check_visible_text(item['caption'], 'caption', where)
            resolve_image_path(image_root, item['image'], allow_absolute_paths, where, check_file_link=False)

        self.ann = load_annotations(ann_file, {'image': str, 'caption': (str, list)}, check=check,
                                    index_tag=f'pretrain {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.max_words = max_words
        self.image_root = image_root
        self.allow_absolute_paths = allow_absolute_paths
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        caption = ann['caption']
        if isinstance(caption, list):
            caption = random.choice(caption)
        path = resolve_image_path(self.image_root, ann['image'], self.allow_absolute_paths, self.ann.where(index))
        image = self.transform(self._open(path, index))
        return image, pre_caption(caption, self.max_words)


class re_train_dataset(ImageDatasetBase, Dataset):
    """Retrieval training: items {'image' (relative to image_root), 'caption' str, 'image_id' str/int}.

    Item: (image, caption, img_idx) where img_idx numbers the distinct image_id values consecutively in order of
    first appearance (the ITC positives). `img_ids` holds that mapping.
    """

    def __init__(self, ann_file, transform, image_root, max_words: int = 30, *,
                 allow_absolute_paths: bool = False, skip_bad_images: bool = False):
        self.ann = load_annotations(ann_file, {'image': str, 'caption': str, 'image_id': (str, int)},
                                    check=_path_checker(image_root, allow_absolute_paths),
                                    index_tag=f're_train {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.allow_absolute_paths = allow_absolute_paths
        self.img_ids: dict = {}
        for ann in self.ann:
            self.img_ids.setdefault(ann['image_id'], len(self.img_ids))
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        path = resolve_image_path(self.image_root, ann['image'], self.allow_absolute_paths, self.ann.where(index))
        image = self.transform(self._open(path, index))
        return image, pre_caption(ann['caption'], self.max_words), self.img_ids[ann['image_id']]


class re_eval_dataset(ImageDatasetBase, Dataset):
    """Retrieval evaluation: items {'image' (relative), 'caption': non-empty list of str}; one item per image.

    Attributes driving evaluation: `text` (all normalised captions in file order), `image` (image paths as in
    the file), `txt2img` {text index: image index}, `img2txt` {image index: [text indices]}.
    Item: (image, image index).
    """

    def __init__(self, ann_file, transform, image_root, max_words: int = 30, *,
                 allow_absolute_paths: bool = False, skip_bad_images: bool = False):
        path_check = _path_checker(image_root, allow_absolute_paths)

        def check(item, where):
            if not item['caption']:
                raise DataError(f'{where}: image {item["image"]!r} has an empty caption list')
            path_check(item, where)

        self.ann = load_annotations(ann_file, {'image': str, 'caption': list}, check=check,
                                    index_tag=f're_eval {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.allow_absolute_paths = allow_absolute_paths
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.ann):
            self.image.append(ann['image'])
            self.img2txt[img_id] = []
            for caption in ann['caption']:
                txt_id = len(self.text)
                self.text.append(pre_caption(caption, self.max_words))
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        path = resolve_image_path(self.image_root, self.ann[index]['image'], self.allow_absolute_paths,
                                  self.ann.where(index))
        return self.transform(self._open(path, index)), index
