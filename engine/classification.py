"""The recipe of a classification fine-tuning script (NLVR.py, VE.py): its command line, its predict function and
`run_task`, which fine-tunes (or with --evaluate only evaluates) and reports accuracy on val and test every epoch.

A script supplies only its batch layout (an `engine.steps.InputsFn`) and its class names; the evaluation itself
(gathering predictions across ranks, accuracy metrics, the per-epoch evaluator) is `evaluation.classification`.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Mapping, Sequence

import torch

import utils
from dataset import create_dataset
from dataset.resumable import build_train_loader
from engine.build import build_model, build_tokenizer, load_for_evaluation
from engine.loop import train
from engine.precision import autocast
from engine.steps import InputsFn
from evaluation.classification import EpochEvaluator, PredictFn
from evaluation.common import build_eval_loaders


def get_args_parser(title: str, default_config: str, default_output: str, label: str) -> argparse.ArgumentParser:
    """The arguments of a classification fine-tuning script: the common ones of `utils.get_parent_parser` plus
    --evaluate. `label` names the task in the --evaluate help."""
    parser = argparse.ArgumentParser(title, parents=[utils.get_parent_parser(default_config, default_output)])
    parser.add_argument('--evaluate', action='store_true',
                        help=f'only evaluate --checkpoint (a fine-tuned {label} checkpoint) on val and test')
    return parser


def make_predict_fn(inputs_fn: InputsFn, tokenizer, device: torch.device, max_tokens: int,
                    precision: str) -> PredictFn:
    """The evaluator's predict_fn: (model, batch) -> (fp32 logits [B, C], targets), under `precision`'s autocast."""
    def predict(model, batch):
        images, ids, mask, targets = inputs_fn(batch, tokenizer, device, max_tokens)
        with autocast(device, precision):
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
    tokenizer = build_tokenizer(config)
    train_set, val_set, test_set = create_dataset(task, config)
    workers = config.get('num_workers', 4)
    val_loader, test_loader = build_eval_loaders([val_set, test_set], eval_batch_size, workers)
    if args.evaluate:
        model = model_without_ddp = load_for_evaluation(task, config, tokenizer, args, device)
    else:
        model, model_without_ddp = build_model(task, config, tokenizer, args, device, resume=args.resume)
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
    state = train(args, config, model, model_without_ddp, loader, make_step_fn(tokenizer, device, max_tokens),
                  device, evaluate_fn=evaluator, best_metric='val_acc', save_epoch_checkpoints=save_epoch_checkpoints)
    evaluator.finish(state.best_epoch)
    print(f'best epoch: {state.best_epoch}', flush=True)
    return state
