"""VQA v2 (+ Visual Genome QA) dataset."""
from __future__ import annotations

from torch.utils.data import Dataset

from dataset.utils import (DataError, ImageDatasetBase, check_visible_text, load_annotations, load_answer_list,
                           pre_question, resolve_image_path)

ROOT_KEYS = {'vqa': 'vqa_root', 'vg': 'vg_root'}


class vqa_dataset(ImageDatasetBase, Dataset):
    """VQA questions. Items {'question', 'image' (relative to the root of its 'dataset'), 'dataset' in
    {'vqa', 'vg'}} plus, for training, 'answer' (list of human answers for 'vqa', one string for 'vg') and, for
    the test split, 'question_id'.

    train item: (image, question, answers, weights). 'vqa': unique answers in first-occurrence order, each weight
    the sum of 1/len(answers) over its occurrences; 'vg': ([answer], [0.5]). The eos string is appended to every
    answer without a space ("yes" -> "yes[SEP]"); answers are not normalised.
    test item: (image, question, question_id); max_ques_words is forced to 50 and `answer_list` (the candidate
    answers) is loaded into `self.answer_list`. Toy-world extension: test items that carry 'answer' keep them in
    `self.gt_answers` {question_id: answers}.
    An unknown 'dataset' value is a DataError naming the item (the original crashes on an undefined path).
    """

    def __init__(self, ann_file, transform, vqa_root, vg_root, eos: str = '[SEP]', split: str = 'train',
                 max_ques_words: int = 30, answer_list: str = '', *, allow_absolute_paths: bool = False,
                 skip_bad_images: bool = False):
        if split not in ('train', 'test'):
            raise DataError(f"vqa_dataset: split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.roots = {'vqa': vqa_root, 'vg': vg_root}

        def check(item, where):
            ds = item['dataset']
            if ds not in ROOT_KEYS:
                raise DataError(f"{where}: key 'dataset' must be 'vqa' or 'vg', got {ds!r}")
            if self.roots[ds] is None:
                raise DataError(f'{where}: dataset {ds!r} but {ROOT_KEYS[ds]} is not configured')
            if split == 'train' or 'answer' in item:
                ans = item.get('answer')
                if split == 'train' and 'answer' not in item:
                    raise DataError(f"{where}: missing key 'answer'")
                if ds == 'vqa' and split == 'train' and not (
                        isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans)):
                    raise DataError(f"{where}: key 'answer' must be a non-empty list of strings for dataset "
                                    f"'vqa', got {ans!r:.80}")
                if ds == 'vg' and split == 'train' and not isinstance(ans, str):
                    raise DataError(f"{where}: key 'answer' must be a string for dataset 'vg', got {ans!r:.80}")
            check_visible_text(item['question'], 'question', where,
                               normalise=lambda q: pre_question(q, max_ques_words=1 << 30).strip())
            resolve_image_path(self.roots[ds], item['image'], allow_absolute_paths, where, check_file_link=False)

        required = {'question': str, 'image': str, 'dataset': str}
        if split == 'test':
            required['question_id'] = (int, str)
        self.ann = load_annotations(ann_file, required, check=check,
                                    index_tag=f'vqa {split} {max_ques_words} {vqa_root!r} {vg_root!r} '
                                              f'{bool(allow_absolute_paths)}')
        self.transform = transform
        self.vqa_root = vqa_root
        self.vg_root = vg_root
        self.eos = eos
        self.allow_absolute_paths = allow_absolute_paths
        self.max_ques_words = 50 if split == 'test' else max_ques_words
        if split == 'test':
            self.answer_list = load_answer_list(answer_list)
            self.gt_answers = {ann['question_id']: ann['answer'] for ann in self.ann if 'answer' in ann}
        self._init_image_loading(skip_bad_images)

    def _load(self, index):
        ann = self.ann[index]
        where = self.ann.where(index)
        path = resolve_image_path(self.roots[ann['dataset']], ann['image'], self.allow_absolute_paths, where)
        human = [] if self.split == 'test' else ann['answer'] if ann['dataset'] == 'vqa' else [ann['answer']]
        image = self.transform(self._open(path, index))
        question = pre_question(ann['question'], self.max_ques_words)
        if self.split == 'test':
            return image, question, ann['question_id']
        if ann['dataset'] == 'vqa':
            weights: dict[str, float] = {}
            share = 1 / len(human)
            for answer in human:
                # Repeated addition (not count/total) so the float values equal the original's bit for bit.
                weights[answer] = weights.get(answer, 0.0) + share
            answers, weight_list = list(weights.keys()), list(weights.values())
        else:
            answers, weight_list = human, [0.5]
        answers = [a + self.eos for a in answers]
        return image, question, answers, weight_list
