"""dataset.resumable: sample order and per-sample augmentation depend only on (seed, epoch, index)."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.resumable import ResumableSampler, SeededDataset


class RandomItems(Dataset):
    """Each item draws from all three global RNGs, like an augmentation pipeline does."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def collect(loader):
    return torch.cat([b for b in loader])


def make_loader(seed, epoch, start_batch=0, workers=0, replicas=1, rank=0):
    ds = SeededDataset(RandomItems(), seed=seed)
    sampler = ResumableSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, batch_size=4)
    sampler.set_epoch(epoch, start_batch=start_batch)
    # The loader's own generator keeps it from drawing its worker base seed from the global torch RNG.
    return DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_epoch_is_identical_across_worker_counts():
    a = collect(make_loader(1, 0, workers=0))
    b = collect(make_loader(1, 0, workers=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, collect(make_loader(1, 1)))  # another epoch: another order and augmentation


def test_start_batch_skips_exactly():
    full = collect(make_loader(3, 2))
    tail = collect(make_loader(3, 2, start_batch=2))
    assert torch.equal(full[8:], tail)
    assert len(make_loader(3, 2, start_batch=2)) == len(make_loader(3, 2)) - 2


def test_item_seeding_leaves_global_rng_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(()).item(), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    collect(make_loader(5, 0))
    assert (torch.rand(()).item(), np.random.rand(), random.random()) == expected


def test_ranks_partition_the_epoch():
    r0 = collect(make_loader(1, 0, replicas=2, rank=0))[:, 0]
    r1 = collect(make_loader(1, 0, replicas=2, rank=1))[:, 0]
    # 23 items on 2 ranks: one index is repeated as padding, every item is seen.
    assert len(set(r0.tolist()) & set(r1.tolist())) <= 1
    assert set(r0.tolist()) | set(r1.tolist()) == set(float(i) for i in range(23))


def test_wrapper_delegates_attributes():
    class WithText(RandomItems):
        text = ['a', 'b']
    assert SeededDataset(WithText(), 0).text == ['a', 'b']
