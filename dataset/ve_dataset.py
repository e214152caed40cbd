"""SNLI-VE dataset: image premise, text hypothesis, 3-way label."""
from __future__ import annotations

from torch.utils.data import Dataset

from dataset.utils import (DataError, ImageDatasetBase, check_visible_text, load_annotations, pre_caption,
                           resolve_image_path)

LABELS = {'entailment': 2, 'neutral': 1, 'contradiction': 0}


class ve_dataset(ImageDatasetBase, Dataset):
    """Items {'image': Flickr30k image id WITHOUT extension, 'sentence', 'label'}; the file opened is
    image_root/<image>.jpg. Item: (image, sentence, label) with entailment 2, neutral 1, contradiction 0.
    An unknown label is a DataError naming the item."""

    def __init__(self, ann_file, transform, image_root, max_words: int = 30, *,
                 allow_absolute_paths: bool = False, skip_bad_images: bool = False):
        def check(item, where):
            if item['label'] not in LABELS:
                raise DataError(f"{where}: key 'label' must be one of {', '.join(LABELS)}, got {item['label']!r}")
            check_visible_text(item['sentence'], 'sentence', where)
            resolve_image_path(image_root, item['image'] + '.jpg', allow_absolute_paths, where, check_file_link=False)

        self.ann = load_annotations(ann_file, {'image': str, 'sentence': str, 'label': str}, check=check,
                                    index_tag=f've {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.allow_absolute_paths = allow_absolute_paths
        self.labels = dict(LABELS)
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        path = resolve_image_path(self.image_root, ann['image'] + '.jpg', self.allow_absolute_paths,
                                  self.ann.where(index))
        image = self.transform(self._open(path, index))
        return image, pre_caption(ann['sentence'], self.max_words), self.labels[ann['label']]
