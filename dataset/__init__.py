"""Datasets, transforms, samplers and loaders of ALBEF.

`create_dataset(name, config)` builds the datasets of a task, `create_sampler` / `create_loader` wrap them for
(distributed) training and evaluation, `vqa_collate_fn` batches VQA training items.

Deliberate deviation from the original: importing this package changes NO global PIL settings. The original sets
`ImageFile.LOAD_TRUNCATED_IMAGES = True` (silently padding truncated JPEGs with grey) and
`Image.MAX_IMAGE_PIXELS = None` process-wide. Here a truncated or corrupt image is a `DataError` naming the file
and the annotation item (or is skipped and counted with `skip_bad_images: true` in the config), and PIL's
decompression-bomb limit stays in force (a larger image is likewise a DataError).
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset.caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.grounding_dataset import grounding_dataset
from dataset.nlvr_dataset import nlvr_dataset
from dataset.transforms import MEAN, STD, build_transform
from dataset.utils import DataError, is_shard_spec, pre_caption, pre_question
from utils import ConfigError
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset

__all__ = ['DataError', 'create_dataset', 'create_sampler', 'create_loader', 'vqa_collate_fn', 'worker_init_fn',
           'build_transform', 'pre_caption', 'pre_question', 'MEAN', 'STD', 'DATASET_NAMES',
           'pretrain_dataset', 're_train_dataset', 're_eval_dataset', 'vqa_dataset', 'nlvr_dataset', 've_dataset',
           'grounding_dataset']

DATASET_NAMES = ('pretrain', 're', 'vqa', 'nlvr', 've', 'grounding', 'nlvr_pretrain')


def _require(config: Mapping, key: str, name: str):
    if key not in config or config[key] in (None, ''):
        raise ConfigError(f"config key '{key}' is required for dataset '{name}'")
    return config[key]


def create_dataset(name: str, config: Mapping):
    """Build the datasets of task `name` from config.

    Returns: 'pretrain' / 'nlvr_pretrain' -> one dataset; 're', 'nlvr', 've' -> (train, val, test);
    'vqa', 'grounding' -> (train, test).
    Config keys: train_file / val_file / test_file (a path or a list of paths), image_root, vqa_root, vg_root,
    answer_list, image_res; optional augment (see dataset.transforms.build_transform), max_words (default 30), eos
    (VQA, default '[SEP]'), image_root for pretrain (default '': paths used as given), skip_bad_images (training
    sets only; default False) and allow_absolute_paths (default False, True for pretraining).
    Pretraining's train_file entries may also name webdataset tar shards (brace notation allowed), alone or mixed
    with JSON files: the result is then a dataset.shards.ShardDataset.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f'unknown dataset {name!r}; expected one of {", ".join(DATASET_NAMES)}')
    res = _require(config, 'image_res', name)
    max_words = config.get('max_words', 30)
    augment = config.get('augment')
    skip = bool(config.get('skip_bad_images', False))
    allow_abs = bool(config.get('allow_absolute_paths', False))
    req = lambda key: _require(config, key, name)  # noqa: E731

    if name in ('pretrain', 'nlvr_pretrain'):
        train_file = req('train_file')
        if any(is_shard_spec(f) for f in ([train_file] if isinstance(train_file, str) else train_file)):
            from dataset.shards import ShardDataset  # webdataset is imported only by runs that read shards
            return ShardDataset(train_file, build_transform('pretrain', res, augment), max_words,
                                image_root=config.get('image_root', '') or '',
                                allow_absolute_paths=bool(config.get('allow_absolute_paths', True)),
                                skip_bad_images=skip)
        return pretrain_dataset(req('train_file'), build_transform('pretrain', res, augment), max_words,
                                image_root=config.get('image_root', '') or '',
                                allow_absolute_paths=bool(config.get('allow_absolute_paths', True)),
                                skip_bad_images=skip)

    train_tf = build_transform('train', res, augment)
    test_tf = build_transform('test', res)
    opts = dict(allow_absolute_paths=allow_abs)
    if name == 're':
        root = req('image_root')
        return (re_train_dataset(req('train_file'), train_tf, root, max_words, skip_bad_images=skip,
                                 **opts),
                re_eval_dataset(req('val_file'), test_tf, root, max_words, **opts),
                re_eval_dataset(req('test_file'), test_tf, root, max_words, **opts))
    if name == 'vqa':
        vqa_root, vg_root = req('vqa_root'), config.get('vg_root')
        eos = config.get('eos', '[SEP]')
        train = vqa_dataset(req('train_file'), train_tf, vqa_root, vg_root, eos=eos, split='train',
                            max_ques_words=max_words, skip_bad_images=skip, **opts)
        test = vqa_dataset(req('test_file'), test_tf, vqa_root, vg_root, eos=eos, split='test',
                           answer_list=req('answer_list'), **opts)
        return train, test
    if name == 'nlvr':
        root = req('image_root')
        return (nlvr_dataset(req('train_file'), train_tf, root, max_words=max_words, skip_bad_images=skip, **opts),
                nlvr_dataset(req('val_file'), test_tf, root, max_words=max_words, **opts),
                nlvr_dataset(req('test_file'), test_tf, root, max_words=max_words, **opts))
    if name == 've':
        root = req('image_root')
        return (ve_dataset(req('train_file'), train_tf, root, max_words, skip_bad_images=skip, **opts),
                ve_dataset(req('val_file'), test_tf, root, max_words, **opts),
                ve_dataset(req('test_file'), test_tf, root, max_words, **opts))
    # grounding
    root = req('image_root')
    return (grounding_dataset(req('train_file'), build_transform('grounding_train', res, augment), root, max_words,
                              mode='train', skip_bad_images=skip, **opts),
            grounding_dataset(req('test_file'), test_tf, root, max_words, mode='test', **opts))


def vqa_collate_fn(batch):
    """Batch VQA training items: (images [B,3,R,R], questions [B], answers (flat list), weights (flat float
    tensor), n = number of answers per question)."""
    images, questions, answers, weights, n = [], [], [], [], []
    for image, question, answer, weight in batch:
        images.append(image)
        questions.append(question)
        answers += answer
        weights += weight
        n.append(len(answer))
    return torch.stack(images, dim=0), questions, answers, torch.tensor(weights, dtype=torch.float32), n


def create_sampler(datasets: Sequence, shuffles: Sequence[bool], num_tasks: int, global_rank: int) -> list:
    """One DistributedSampler per dataset (num_replicas=num_tasks, rank=global_rank, seed 0). Padding repeats
    indices so every rank gets the same count (evaluation shards may hold duplicates, as in the original)."""
    if len(datasets) != len(shuffles):
        raise ValueError(f'create_sampler: {len(datasets)} datasets but {len(shuffles)} shuffle flags')
    return [DistributedSampler(ds, num_replicas=num_tasks, rank=global_rank, shuffle=bool(sh))
            for ds, sh in zip(datasets, shuffles)]


def worker_init_fn(worker_id: int) -> None:
    """Seed `random` and numpy's global RNG in a DataLoader worker from the worker's torch seed.

    torch gives each worker the seed base_seed + worker_id, with base_seed drawn from the main process's torch
    RNG; deriving the numpy/random states from it makes RandomAugment (numpy) and caption choice (random) differ
    between workers yet reproducible from torch.manual_seed. (OpenCV's thread count is deliberately not touched:
    cv2.setNumThreads in a forked worker deadlocks once the parent process has used OpenCV's thread pool.)
    """
    seed = torch.initial_seed() % 2 ** 64
    random.seed(seed)
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))


def create_loader(datasets: Sequence, samplers: Sequence, batch_size: Sequence[int], num_workers: Sequence[int],
                  is_trains: Sequence[bool], collate_fns: Sequence) -> list[DataLoader]:
    """One DataLoader per dataset.

    Training loaders: shuffle when there is no sampler, drop_last True; evaluation loaders: no shuffle, keep the
    last batch. pin_memory only when CUDA is available; persistent_workers when num_workers > 0; workers seeded
    with `worker_init_fn`.
    """
    lengths = {len(datasets), len(samplers), len(batch_size), len(num_workers), len(is_trains), len(collate_fns)}
    if len(lengths) != 1:
        raise ValueError('create_loader: datasets, samplers, batch_size, num_workers, is_trains and collate_fns '
                         'must have the same length')
    pin = torch.cuda.is_available()
    loaders = []
    for ds, sampler, bs, workers, is_train, collate in zip(datasets, samplers, batch_size, num_workers, is_trains,
                                                          collate_fns):
        shuffle = sampler is None if is_train else False
        loaders.append(DataLoader(
            ds, batch_size=bs, num_workers=workers, pin_memory=pin, sampler=sampler, shuffle=shuffle,
            collate_fn=collate, drop_last=bool(is_train), persistent_workers=workers > 0,
            worker_init_fn=worker_init_fn if workers > 0 else None,
        ))
    return loaders
