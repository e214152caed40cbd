"""Deterministic, resumable data order for training.

Exact resume needs two things the stock DataLoader does not give: (1) the sample order of an epoch must be a
function of (seed, epoch) only, and it must be possible to start it at any batch; (2) the random augmentation of a
sample must not depend on which worker loads it or how many samples that worker loaded before. `ResumableSampler`
gives (1) and `SeededDataset` gives (2) by deriving every sample's RNG state from (seed, epoch, index).

Streaming-friendly data (tar shards, see dataset.shards) declares `blocks()`: runs of indices best read in order.
`BlockOrderSampler` is then the resumable order: blocks shuffled per epoch, each rank a contiguous range of them,
and a seeded shuffle buffer within the range; being a function of (seed, epoch, rank, world size) only, resuming
at a batch is as exact as with `ResumableSampler`.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from dataset.utils import DataError


def _iterate(indices: np.ndarray, chunk: int = 1 << 16):
    """Python ints from an index array, a chunk at a time."""
    for start in range(0, len(indices), chunk):
        yield from indices[start:start + chunk].tolist()


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

    def rank_order(self) -> np.ndarray:
        """This rank's indices of the current epoch, DistributedSampler's order exactly, as one int64 array (its
        list of Python ints costs 36 bytes an index, 0.5 GB at 14M)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        # DistributedSampler pads by repeating the order from its start (cyclically), or drops the tail.
        order = order[:self.total_size] if self.drop_last else np.resize(order, self.total_size)
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return _iterate(self.rank_order()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


SHUFFLE_BUFFER = 1000  # samples; the local mixing of BlockOrderSampler (webdataset's usual size)


def shuffle_buffer(seq: np.ndarray, size: int, seed) -> np.ndarray:
    """`seq` reordered as a shuffle buffer of `size` items does it: fill, then each new item replaces a uniformly
    chosen buffered one, which is emitted; the rest drains in random order. Seeded by `seed` (a SeedSequence
    entropy); an item moves at most a buffer's worth ahead, so reads stay near-sequential."""
    rng = random.Random(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    pick = rng.randrange
    buf: list = []
    out = np.empty(len(seq), dtype=np.int64)
    done = 0
    for start in range(0, len(seq), 1 << 20):  # a chunk at a time: a list of Python ints costs 36 bytes an item
        emitted = []
        for item in seq[start:start + (1 << 20)].tolist():
            if len(buf) < size:
                buf.append(item)
                continue
            j = pick(size)
            emitted.append(buf[j])
            buf[j] = item
        out[done:done + len(emitted)] = emitted
        done += len(emitted)
    rng.shuffle(buf)
    out[done:] = buf
    return out


class BlockOrderSampler(ResumableSampler):
    """ResumableSampler for a dataset with `blocks()` ([n, 2] first index, length): the epoch's order is the blocks
    in an order shuffled from (seed, epoch), concatenated and padded by wrapping around to a multiple of the world
    size; rank r takes the r-th contiguous range of it (so each rank reads a few whole shards), which a shuffle
    buffer of `buffer_size` seeded from (seed, epoch, rank) mixes locally. Every index occurs once per epoch
    across the ranks, apart from the padding (as with DistributedSampler). Batches go to the loader's workers in
    turn, so the workers of a rank split its range batch by batch; the order does not depend on their number.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1,
                 buffer_size: int = SHUFFLE_BUFFER):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         batch_size=batch_size)
        self.buffer_size = buffer_size

    def rank_order(self) -> np.ndarray:
        """This rank's indices for the current epoch, from its first batch."""
        blocks = np.asarray(self.dataset.blocks(), dtype=np.int64).reshape(-1, 2)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks))
        seq = np.concatenate([np.arange(first, first + n, dtype=np.int64) for first, n in blocks[perm]])
        seq = np.resize(seq, self.total_size)  # wrap around, as DistributedSampler pads
        mine = seq[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]
        return shuffle_buffer(mine, self.buffer_size, [self.seed, self.epoch, self.rank])


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

    Shuffled per epoch by a `ResumableSampler` (a `BlockOrderSampler` for data with `blocks()`) across all ranks
    (padding as DistributedSampler does), the last
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
    if hasattr(dataset, 'blocks'):  # tar shards (maybe with JSON files): read runs of samples in order
        sampler = BlockOrderSampler(seeded, num_replicas=world, rank=rank, seed=seed, batch_size=batch_size)
    else:
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
