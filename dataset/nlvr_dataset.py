"""NLVR2 dataset: two images, one sentence, a true/false label."""
from __future__ import annotations

from torch.utils.data import Dataset

from dataset.utils import (DataError, ImageDatasetBase, check_visible_text, load_annotations, pre_caption,
                           resolve_image_path)


class nlvr_dataset(ImageDatasetBase, Dataset):
    """Items {'images': [path0, path1] relative to image_root, 'sentence', 'label'}.

    Item: (image0, image1, sentence, label) with label 1 for the string 'True' and 0 for 'False'; the random
    transform is applied to each image independently. Deviation: any other label value (including JSON true/false,
    which the original silently maps to 0) is a DataError naming the item. `max_words` is fixed at 30 in the
    original; here it is a keyword with that default.
    """

    def __init__(self, ann_file, transform, image_root, *, max_words: int = 30,
                 allow_absolute_paths: bool = False, skip_bad_images: bool = False):
        def check(item, where):
            if len(item['images']) != 2:
                raise DataError(f"{where}: key 'images' must list exactly 2 image paths, got {len(item['images'])}")
            for p in item['images']:
                resolve_image_path(image_root, p, allow_absolute_paths, where, check_file_link=False)
            if item['label'] not in ('True', 'False'):
                raise DataError(f"{where}: key 'label' must be the string 'True' or 'False', got {item['label']!r}")
            check_visible_text(item['sentence'], 'sentence', where)

        self.ann = load_annotations(ann_file, {'images': list, 'sentence': str, 'label': str},
                                    check=check, index_tag=f'nlvr {image_root!r} {bool(allow_absolute_paths)}')
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.allow_absolute_paths = allow_absolute_paths
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        where = self.ann.where(index)
        images = [self.transform(self._open(resolve_image_path(self.image_root, p, self.allow_absolute_paths,
                                                                where), index))
                  for p in ann['images']]
        sentence = pre_caption(ann['sentence'], self.max_words)
        label = 1 if ann['label'] == 'True' else 0
        return images[0], images[1], sentence, label
