"""ResumableSampler computes its order as an index array (no list of Python ints per epoch): the order must stay
exactly DistributedSampler's, so resuming runs started before keeps working."""
import pytest
from torch.utils.data import DistributedSampler

from dataset.resumable import ResumableSampler


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize('n,replicas', [(23, 1), (23, 2), (5, 4), (3, 8), (100, 3), (1, 1)])
@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('drop_last', [False, True])
def test_order_equals_distributed_sampler(n, replicas, shuffle, drop_last):
    for rank in range(replicas):
        for epoch in (0, 3):
            ours = ResumableSampler(Sized(n), replicas, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref = DistributedSampler(Sized(n), replicas, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            got = list(ours)
            assert got == list(ref) and all(type(i) is int for i in got)


def test_start_batch_skips_a_prefix_of_the_same_order():
    s = ResumableSampler(Sized(1000), 2, 1, seed=3, batch_size=7)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=5)
    assert list(s) == full[35:] and len(s) == len(full) - 35
