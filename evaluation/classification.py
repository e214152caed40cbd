"""The classification evaluator shared by NLVR.py and VE.py: accuracy and per-class accuracy over a loader.

The original's NLVR2 / SNLI-VE `evaluate` averages batch accuracies weighted by batch size on every rank and
all-reduces them, so the items that DistributedSampler repeats to even out the shards are counted twice.
Here every rank records the dataset index of each item it predicted (read from the loader's batch sampler), the
(index, prediction, target) triples are gathered from all ranks, and each index is counted once. At world size 1
without a process group the gather is a no-op.

Pieces, from low to high level:

* `collect_predictions` - this rank's (indices, predictions, targets) for one loader;
* `merge_shards` - the union of the ranks' results without duplicates, ordered by dataset index
  (evaluation/common.py);
* `accuracy_metrics` - accuracy, per-class accuracy and the confusion matrix of predictions vs. targets;
* `evaluate` - the three above, gathered across ranks;
* `build_eval_loaders` (evaluation/common.py), `EpochEvaluator` - what a task script needs to evaluate named
  splits every epoch (or once, with --evaluate) and to write the readable results file.

The fine-tuning recipe of NLVR.py and VE.py (command line, step and predict functions, `run_task`) is
`engine.classification`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

import utils
from evaluation.common import ResultsFile, batch_indices, merge_shards

# predict_fn(model, batch) -> (logits [B, C], targets [B]); it moves the batch to the model's device itself.
PredictFn = Callable[[torch.nn.Module, object], tuple]


@torch.no_grad()
def collect_predictions(model: torch.nn.Module, loader: DataLoader, predict_fn: PredictFn, *,
                        header: str = 'Evaluation', print_freq: int = 50) -> dict[str, list[int]]:
    """Run `predict_fn` over this rank's share of `loader`; returns {'index', 'pred', 'target'} lists.

    The model is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    index_batches = batch_indices(loader)
    was_training = model.training
    model.eval()
    out: dict[str, list[int]] = {'index': [], 'pred': [], 'target': []}
    logger = utils.MetricLogger(window_size=50)
    try:
        for indices, batch in logger.log_every(zip(index_batches, loader), print_freq, header,
                                               total=len(index_batches)):
            logits, targets = predict_fn(model, batch)
            if logits.dim() != 2 or logits.size(0) != len(indices) or targets.numel() != len(indices):
                raise RuntimeError(f'{header}: predict_fn returned logits {tuple(logits.shape)} and '
                                   f'{targets.numel()} targets for a batch of {len(indices)} items')
            pred = logits.argmax(dim=1).cpu()
            targets = targets.reshape(-1).cpu().long()
            logger.update(acc=(pred == targets).float().mean().item())
            out['index'] += indices
            out['pred'] += pred.tolist()
            out['target'] += targets.tolist()
    finally:
        model.train(was_training)
    return out


def accuracy_metrics(preds: Sequence[int], targets: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy (a fraction, as the original), per-class accuracy (recall of each target class; None for a class
    with no items), per-class counts, their unweighted mean, and the confusion matrix [target][prediction]."""
    n_cls = len(class_names)
    confusion = [[0] * n_cls for _ in range(n_cls)]
    for p, t in zip(preds, targets):
        if not (0 <= t < n_cls and 0 <= p < n_cls):
            raise ValueError(f'prediction {p} / target {t} outside the {n_cls} classes {list(class_names)}')
        confusion[t][p] += 1
    n = len(targets)
    correct = sum(confusion[c][c] for c in range(n_cls))
    counts = {name: sum(confusion[c]) for c, name in enumerate(class_names)}
    per_class = {name: (confusion[c][c] / counts[name] if counts[name] else None)
                 for c, name in enumerate(class_names)}
    present = [v for v in per_class.values() if v is not None]
    return {'acc': correct / n if n else 0.0, 'n': n, 'per_class_acc': per_class, 'per_class_n': counts,
            'mean_per_class_acc': sum(present) / len(present) if present else 0.0, 'confusion': confusion}


def evaluate(model: torch.nn.Module, loader: DataLoader, predict_fn: PredictFn, class_names: Sequence[str], *,
             header: str = 'Evaluation', print_freq: int = 50) -> dict:
    """Accuracy metrics of `model` on the whole dataset behind `loader`, gathered across ranks without the
    sampler's padded duplicates (every rank gets the same result). See `accuracy_metrics` for the keys."""
    local = collect_predictions(model, loader, predict_fn, header=header, print_freq=print_freq)
    merged = merge_shards(utils.all_gather_object(local), ('pred', 'target'))
    expected = len(loader.dataset)
    if len(merged['index']) != expected:
        # A drop_last loader or a sampler that skips items would make the metric silently partial.
        raise RuntimeError(f'{header}: predictions cover {len(merged["index"])} of {expected} items')
    return accuracy_metrics(merged['pred'], merged['target'], class_names)


# ----------------------------------------------------------------------------------------------------------------
# What the task scripts build on
# ----------------------------------------------------------------------------------------------------------------
class EpochEvaluator:
    """evaluate_fn for engine.fit: evaluates named splits and returns the log record of an epoch.

    The record holds '<split>_acc' (the best-metric key is 'val_acc') and '<split>_per_class_acc' for each split;
    the full metrics (with counts and confusion matrices) of every epoch go to the readable `results_path` JSON,
    which `finish` completes with the best epoch and its metrics.
    """

    def __init__(self, model: torch.nn.Module, loaders: Mapping[str, DataLoader], predict_fn: PredictFn,
                 class_names: Sequence[str], results_path: str, *, resume: bool = False, print_freq: int = 50):
        self.model, self.loaders, self.predict_fn = model, dict(loaders), predict_fn
        self.class_names, self.results_path, self.print_freq = list(class_names), results_path, print_freq
        self.file = ResultsFile(results_path, {'class_names': self.class_names}, resume=resume)
        self.results = self.file.data

    def run(self, label: str) -> dict[str, dict]:
        """Metrics of every split, stored under `label` in the results file; returns {split: metrics}."""
        metrics = {split: evaluate(self.model, loader, self.predict_fn, self.class_names,
                                   header=f'Evaluate {split} [{label}]', print_freq=self.print_freq)
                   for split, loader in self.loaders.items()}
        for split, m in metrics.items():
            print(f'{split}: acc {m["acc"]:.4f} on {m["n"]} items; per class '
                  + ', '.join(f'{k} {"-" if v is None else f"{v:.4f}"}' for k, v in m['per_class_acc'].items()),
                  flush=True)
        self.file.add(label, metrics)
        return metrics

    @staticmethod
    def record(metrics: Mapping[str, dict]) -> dict:
        """The log.txt fields of one evaluation: <split>_acc and <split>_per_class_acc."""
        out = {}
        for split, m in metrics.items():
            out[f'{split}_acc'] = m['acc']
            out[f'{split}_per_class_acc'] = m['per_class_acc']
        return out

    def __call__(self, epoch: int) -> dict:
        return self.record(self.run(str(epoch)))

    def finish(self, best_epoch: int | None) -> None:
        """Add the best epoch (by validation accuracy, chosen by engine.fit) and its metrics to the results file."""
        self.file.finish(best_epoch)
