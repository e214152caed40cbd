"""What every evaluator shares: in-order sharded loaders, the union of the ranks' results, the results JSON file.

* `build_eval_loaders` / `batch_indices` - evaluation loaders that never shuffle, and the dataset indices of the
  batches they will yield (so that each prediction can be tied to its item); `progress_iter` - a loop with or
  without the progress display;
* `merge_shards` - the per-rank results gathered from all ranks, each dataset index once: DistributedSampler pads
  the last shards with repeats of the first indices, which the original counted twice;
* `ResultsFile` - the readable JSON file of an evaluator: every evaluation under 'epochs' (kept across a resume),
  the best one added at the end, written atomically by the main process.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

from torch.utils.data import DataLoader, RandomSampler

import utils


# ----------------------------------------------------------------------------------------------------------------
# Loaders and their batches
# ----------------------------------------------------------------------------------------------------------------
def build_eval_loaders(datasets: Sequence, batch_size: int, num_workers: int) -> list[DataLoader]:
    """In-order evaluation loaders, sharded across ranks when torch.distributed runs (padding is undone by
    `merge_shards`), plain sequential loaders otherwise."""
    # dataset imports OpenCV: the evaluators stay importable without it (gpu_check on a bare CUDA image)
    from dataset import create_loader, create_sampler
    n = len(datasets)
    if utils.is_dist_avail_and_initialized():
        samplers = create_sampler(datasets, [False] * n, utils.get_world_size(), utils.get_rank())
    else:
        samplers = [None] * n
    return create_loader(datasets, samplers, [batch_size] * n, [num_workers] * n, [False] * n, [None] * n)


def batch_indices(loader: DataLoader) -> list[list[int]]:
    """The dataset indices of every batch the loader will yield, in order.

    The batch sampler is iterated once here and once by the loader, so its order must not depend on a fresh
    random draw: a shuffling RandomSampler is refused (DistributedSampler is deterministic for a given epoch).
    """
    if getattr(loader, 'batch_sampler', None) is None:
        raise ValueError('evaluation loader must batch with a sampler (batch_size set); got batch_size=None')
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError('evaluation loader must not shuffle (its RandomSampler gives another order on every pass)')
    return [list(map(int, b)) for b in loader.batch_sampler]


def progress_iter(iterable, n: int, header: str, progress: bool, print_freq: int | None = None):
    """`iterable` with the MetricLogger progress display (about ten lines for `n` items) or silently."""
    if not progress:
        return iterable
    freq = print_freq or max(1, math.ceil(n / 10))
    return utils.MetricLogger().log_every(iterable, freq, header, total=n)


# ----------------------------------------------------------------------------------------------------------------
# Per-rank results
# ----------------------------------------------------------------------------------------------------------------
def merge_shards(shards: Sequence[Mapping[str, Sequence]], fields: Sequence[str]) -> dict[str, list]:
    """Union of per-rank results, each dataset index once (its first occurrence), sorted by index.

    Every shard holds 'index' (dataset indices) and, aligned with it, one sequence per name in `fields`.
    Returns {'index': sorted indices, field: values in that order, ...}.
    """
    seen: dict[int, tuple] = {}
    for shard in shards:
        for index, *values in zip(shard['index'], *(shard[f] for f in fields)):
            seen.setdefault(int(index), tuple(values))
    order = sorted(seen)
    out: dict[str, list] = {'index': order}
    for k, field in enumerate(fields):
        out[field] = [seen[i][k] for i in order]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
    """Write a readable (indented) JSON file atomically, on the main process only.

    NaN (e.g. the accuracy of a split without items) is not JSON; it is written as null.
    """
    if utils.is_main_process():
        clean = json.loads(json.dumps(obj), parse_constant=lambda c: None)
        utils.atomic_write_text(path, json.dumps(clean, indent=2) + '\n')


class ResultsFile:
    """An evaluator's readable JSON file: fixed `header` fields, then every evaluation under 'epochs'.

    With `resume` the evaluations already in an existing file are kept (a resumed run continues the record).
    `finish` adds 'best_epoch' and the best evaluation's metrics: under 'best', or with `best_at_top_level`
    merged into the top level (the retrieval file's layout). Nothing is written when `path` is None.
    """

    def __init__(self, path: str | None, header: Mapping, *, resume: bool = False,
                 best_at_top_level: bool = False):
        self.path, self.best_at_top_level = path, best_at_top_level
        self.data: dict = {**header, 'epochs': {}}
        if resume and path and os.path.isfile(path):  # keep the epochs evaluated before the interruption
            with open(path, encoding='utf-8') as f:
                self.data['epochs'] = json.load(f).get('epochs', {})

    def add(self, label: str, metrics) -> None:
        """Store one evaluation's metrics under `label` and rewrite the file."""
        self.data['epochs'][label] = metrics
        self.write()

    def finish(self, best_label) -> None:
        """Record the best evaluation (chosen by engine.fit; None: none) and rewrite the file."""
        if best_label is not None and str(best_label) in self.data['epochs']:
            best = self.data['epochs'][str(best_label)]
            self.data['best_epoch'] = best_label
            if self.best_at_top_level:
                self.data.update(best)
            else:
                self.data['best'] = best
        self.write()

    def write(self) -> None:
        if self.path:
            write_json(self.path, self.data)
