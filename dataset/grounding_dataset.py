"""RefCOCO+ referring expressions for weakly supervised grounding."""
from __future__ import annotations

from torch.utils.data import Dataset

from dataset.utils import (DataError, ImageDatasetBase, check_visible_text, load_annotations, pre_caption,
                           resolve_image_path)


class grounding_dataset(ImageDatasetBase, Dataset):
    """Items {'image' (relative to image_root), 'text'} plus 'ref_id' (int) in test mode.

    mode 'train' item: (image, text, img_idx) where img_idx numbers distinct image basenames (text after the last
    '/') in order of first appearance (`img_ids` holds the mapping); mode 'test' item: (image, text, ref_id).
    """

    def __init__(self, ann_file, transform, image_root, max_words: int = 30, mode: str = 'train', *,
                 allow_absolute_paths: bool = False, skip_bad_images: bool = False):
        if mode not in ('train', 'test'):
            raise DataError(f"grounding_dataset: mode must be 'train' or 'test', got {mode!r}")

        def check(item, where):
            check_visible_text(item['text'], 'text', where)
            resolve_image_path(image_root, item['image'], allow_absolute_paths, where, check_file_link=False)

        required = {'image': str, 'text': str}
        if mode == 'test':
            required['ref_id'] = int
        self.ann = load_annotations(ann_file, required, check=check,
                                    index_tag=f'grounding {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.mode = mode
        self.allow_absolute_paths = allow_absolute_paths
        self.img_ids: dict[str, int] = {}
        if mode == 'train':
            for ann in self.ann:
                self.img_ids.setdefault(ann['image'].split('/')[-1], len(self.img_ids))
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        path = resolve_image_path(self.image_root, ann['image'], self.allow_absolute_paths, self.ann.where(index))
        image = self.transform(self._open(path, index))
        caption = pre_caption(ann['text'], self.max_words)
        if self.mode == 'train':
            return image, caption, self.img_ids[ann['image'].split('/')[-1]]
        return image, caption, ann['ref_id']
