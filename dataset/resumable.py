"""Deterministic, resumable data order for training.

Exact resume needs two things the stock DataLoader does not give: (1) the sample order of an epoch must be a
function of (seed, epoch) only, and it must be possible to start it at any batch; (2) the random augmentation of a
sample must not depend on which worker loads it or how many samples that worker loaded before. `ResumableSampler`
gives (1) and `SeededDataset` gives (2) by deriving every sample's RNG state from (seed, epoch, index).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from dataset.utils import DataError


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (also used at world size 1) that can skip the first `start_batch` batches."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and the batch to start from (0 = from the beginning)."""
        super().set_epoch(epoch)
        self.start_batch = start_batch
        if isinstance(self.dataset, SeededDataset):
            self.dataset.epoch = epoch

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


class SeededDataset(Dataset):
    """Wrap a dataset so each item's randomness (numpy, random, torch) is seeded from (seed, epoch, index).

    The global RNG states of the calling process are restored afterwards, so loading in the main process
    (num_workers=0) does not disturb the model's random stream.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        # Delegate attributes such as `text`, `img2txt` or `answer_list` to the wrapped dataset.
        if name in ('dataset', 'seed', 'epoch'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        item_seed = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(int(item_seed))
            np.random.seed(int(item_seed))
            torch.manual_seed(int(item_seed))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_train_loader(dataset, batch_size: int, num_workers: int, seed: int, collate_fn=None):
    """A training DataLoader whose order and augmentation are reproducible and resumable.

    Shuffled per epoch by a `ResumableSampler` across all ranks (padding as DistributedSampler does), the last
    incomplete batch dropped (as the original's training loaders), pinned memory on CUDA. Workers are not
    persistent: they are re-created each epoch so they see the epoch number set on `SeededDataset`.
    The loader has its own generator so that it never draws from the global torch RNG. A training set smaller
    than one batch per process is a DataError (no step would run).
    """
    from torch.utils.data import DataLoader
    import torch.distributed as dist
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    seeded = SeededDataset(dataset, seed)
    sampler = ResumableSampler(seeded, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                               batch_size=batch_size)
    if sampler.num_samples < batch_size:  # drop_last would leave no batch at all: training would silently do nothing
        files = getattr(getattr(dataset, 'ann', None), 'files', None)
        source = f' ({", ".join(files)})' if files else ''
        raise DataError(f'the training set{source} has {len(dataset)} items, fewer than one batch of {batch_size} '
                        f'per process ({world} process{"es" if world > 1 else ""}): lower the batch size')
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))
