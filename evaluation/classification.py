"""The classification evaluator shared by NLVR.py and VE.py: accuracy and per-class accuracy over a loader.

The original's NLVR2 / SNLI-VE `evaluate` averages batch accuracies weighted by batch size on every rank and
all-reduces them, so the items that DistributedSampler repeats to even out the shards are counted twice (spec 15.13).
Here every rank records the dataset index of each item it predicted (read from the loader's batch sampler), the
(index, prediction, target) triples are gathered from all ranks, and each index is counted once. At world size 1
without a process group the gather is a no-op.

Pieces, from low to high level:

* `collect_predictions` - this rank's (indices, predictions, targets) for one loader;
* `merge_shards` - the union of the ranks' results without duplicates, ordered by dataset index
  (evaluation/common.py);
* `accuracy_metrics` - accuracy, per-class accuracy and the confusion matrix of predictions vs. targets;
* `evaluate` - the three above, gathered across ranks;
* `build_eval_loaders` (evaluation/common.py), `EpochEvaluator`, `load_for_evaluation` - what a task script
  needs to evaluate named splits every epoch (or once, with --evaluate) and to write the readable results file;
* `get_args_parser`, `make_step_fn`, `make_predict_fn`, `run_task` - the whole command line of a classification
  fine-tuning script, which only supplies its batch layout (an `inputs_fn`) and its class names.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

import utils
from evaluation.common import ResultsFile, batch_indices, build_eval_loaders, merge_shards

# predict_fn(model, batch) -> (logits [B, C], targets [B]); it moves the batch to the model's device itself.
PredictFn = Callable[[torch.nn.Module, object], tuple]
# inputs_fn(batch, tokenizer, device, max_tokens) -> (images, input_ids, attention_mask, targets) on `device`;
# the one thing in which NLVR's and VE's batches differ (NLVR stacks its two images into one tensor).
InputsFn = Callable[[object, object, torch.device, int], tuple]


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


def load_for_evaluation(task: str, config: Mapping, tokenizer, args, device: torch.device) -> torch.nn.Module:
    """The `task` model with the weights of a fine-tuned `task` checkpoint (--evaluate), on `device`.

    Any other checkpoint kind (a pretraining or TA checkpoint) would leave the classifier head random, so it is
    refused with a one-line error naming the file and its kind.
    """
    import models
    from models.checkpoint import load_checkpoint
    if not args.checkpoint:
        raise utils.UserError(f'--evaluate needs --checkpoint (a fine-tuned {task} checkpoint)')
    model = models.create_model(task, config, tokenizer)
    report = load_checkpoint(model, args.checkpoint, task, allow_pickle=args.unsafe_load)
    if report['source_kind'] != task:
        raise utils.UserError(f"--evaluate: {args.checkpoint} is a '{report['source_kind']}' checkpoint, not a "
                              f"fine-tuned '{task}' one (its classifier head would be random); fine-tune first")
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# The command line of NLVR.py and VE.py
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser(title: str, default_config: str, default_output: str, label: str) -> argparse.ArgumentParser:
    """The arguments of a classification fine-tuning script: the common ones of `utils.get_parent_parser` plus
    --evaluate. `label` names the task in the --evaluate help."""
    parser = argparse.ArgumentParser(title, parents=[utils.get_parent_parser(default_config, default_output)])
    parser.add_argument('--evaluate', action='store_true',
                        help=f'only evaluate --checkpoint (a fine-tuned {label} checkpoint) on val and test')
    return parser


def make_step_fn(inputs_fn: InputsFn, tokenizer, device: torch.device, max_tokens: int):
    """engine.fit's step_fn: batch -> {'loss'}, the model's classification cross-entropy with distillation."""
    def step(model, batch, alpha):
        images, ids, mask, targets = inputs_fn(batch, tokenizer, device, max_tokens)
        return model(images, ids, mask, targets, alpha=alpha)
    return step


def make_predict_fn(inputs_fn: InputsFn, tokenizer, device: torch.device, max_tokens: int,
                    precision: str) -> PredictFn:
    """The evaluator's predict_fn: (model, batch) -> (fp32 logits [B, C], targets), under `precision`'s autocast."""
    import engine  # local, like `dataset` and `models` above: importing the evaluator alone stays light

    def predict(model, batch):
        images, ids, mask, targets = inputs_fn(batch, tokenizer, device, max_tokens)
        with engine.autocast(device, precision):
            return model.predict(images, ids, mask).float(), targets
    return predict


def run_task(task: str, args, config: Mapping, device: torch.device, *, class_names: Sequence[str],
             train_batch_size: int, eval_batch_size: int, make_step_fn: Callable, make_predict_fn: Callable,
             save_epoch_checkpoints: bool):
    """main() of a classification fine-tuning script after its arguments and config are checked.

    With args.evaluate: evaluates the fine-tuned --checkpoint on val and test once, appends the record (with the
    checkpoint path) to log.txt and returns it. Otherwise: fine-tunes with engine.fit, evaluating val and test
    after every epoch (best checkpoint by val_acc), completes results.json with the best epoch and returns the
    final TrainState. `make_step_fn(tokenizer, device, max_tokens)` and `make_predict_fn(tokenizer, device,
    max_tokens, precision)` are the script's own factories, so that tests and callers can still swap them there.
    `save_epoch_checkpoints` keeps checkpoint_XX.pth of every epoch (NLVR) or only best and last (VE).
    """
    import engine
    from dataset import create_dataset
    from dataset.resumable import build_train_loader

    tokenizer = engine.build_tokenizer(config)
    train_set, val_set, test_set = create_dataset(task, config)
    workers = config.get('num_workers', 4)
    val_loader, test_loader = build_eval_loaders([val_set, test_set], eval_batch_size, workers)
    if args.evaluate:
        model = model_without_ddp = load_for_evaluation(task, config, tokenizer, args, device)
    else:
        model, model_without_ddp = engine.build_model(task, config, tokenizer, args, device, resume=args.resume)
    max_tokens = model_without_ddp.text_encoder.config.max_position_embeddings
    predict_fn = make_predict_fn(tokenizer, device, max_tokens, config.get('precision', 'fp32'))
    evaluator = EpochEvaluator(model_without_ddp, {'val': val_loader, 'test': test_loader}, predict_fn,
                               class_names, os.path.join(args.output_dir, 'results.json'), resume=args.resume,
                               print_freq=config.get('print_freq', 50))
    if args.evaluate:
        record = evaluator.record(evaluator.run('evaluate'))
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), {**record, 'checkpoint': args.checkpoint})
        return record

    loader = build_train_loader(train_set, train_batch_size, workers, args.seed)
    state = engine.train(args, config, model, model_without_ddp, loader, make_step_fn(tokenizer, device, max_tokens),
                         device, evaluate_fn=evaluator, best_metric='val_acc',
                         save_epoch_checkpoints=save_epoch_checkpoints)
    evaluator.finish(state.best_epoch)
    print(f'best epoch: {state.best_epoch}', flush=True)
    return state
