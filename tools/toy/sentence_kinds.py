"""Toy SNLI-VE / NLVR2 accuracy by sentence kind: does the model fail where the sentence names an object's place?

    python -m tools.toy.sentence_kinds --task ve --checkpoint output/toy_ve/checkpoint_best.pth
    python -m tools.toy.sentence_kinds --task nlvr --checkpoint output/toy_nlvr/checkpoint_best.pth --json

Runs a fine-tuned checkpoint over the split (default test) as VE.py / NLVR.py evaluate it and splits the accuracy
by whether the sentence places an object ("the red diamond is to the right of the big green object", "the
leftmost object in the left image is a circle") or not, and by label. NLVR2's "left image" / "right image" name
one of the two images, not a place, and do not count. NLVR2 is also split by what the statement asks
("statement: more / fewer", ...; `dataset.toyworld.NLVR_STATEMENT_KINDS`). `--config` defaults to the config.yaml
that the task script wrote beside the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from dataset.toyworld import names_a_side, nlvr_statement_kind
from tools.toy.report import emit, missing_input

IMAGE_NAME = re.compile(r'\b(left|right) image\b')


def sentence_kind(sentence: str) -> str:
    """'position' when the sentence places an object (left, right, leftmost, rightmost; not NLVR2's "left image"),
    else 'no position'."""
    return 'position' if names_a_side(IMAGE_NAME.sub(' ', sentence.lower())) else 'no position'


def accuracy_by_kind(sentences, preds, targets, class_names, statement_kind=None) -> dict:
    """{'all' / kind / 'kind / label': {'items', 'accuracy' (%)}} of predictions against targets, plus
    'statement: <statement_kind(sentence)>' when a statement_kind function is given."""
    groups: dict = {}
    for sentence, pred, target in zip(sentences, preds, targets):
        kind = sentence_kind(sentence)
        keys = ['all', kind, f'{kind} / {class_names[target]}']
        if statement_kind is not None:
            keys.append(f'statement: {statement_kind(sentence)}')
        for key in keys:
            groups.setdefault(key, []).append(pred == target)
    return {key: {'items': len(hits), 'accuracy': 100.0 * sum(hits) / len(hits)}
            for key, hits in sorted(groups.items())}


def run(task: str, checkpoint: str, config_path: str, split: str = 'test') -> dict:
    """Predict the split with the checkpoint (the task script's batches and predict function), split the accuracy."""
    import importlib

    import torch

    import models
    import utils
    from dataset import create_dataset
    from engine import build_tokenizer
    from evaluation.classification import collect_predictions
    from evaluation.common import build_eval_loaders
    from models.checkpoint import load_checkpoint
    script = importlib.import_module({'ve': 'VE', 'nlvr': 'NLVR'}[task])
    config = utils.load_config(config_path)
    config['vision_pretrained'] = None  # the checkpoint holds the ViT
    tokenizer = build_tokenizer(config)
    dataset = dict(zip(('train', 'val', 'test'), create_dataset(task, config)))[split]
    # VE.py evaluates with batch_size_test, NLVR.py with its one batch_size
    loader = build_eval_loaders([dataset], config['batch_size_test' if task == 've' else 'batch_size'], 0)[0]
    model = models.create_model(task, config, tokenizer)
    load_checkpoint(model, checkpoint, task)
    device = torch.device('cpu')
    max_tokens = model.text_encoder.config.max_position_embeddings
    out = collect_predictions(model, loader, script.make_predict_fn(tokenizer, device, max_tokens, 'fp32'),
                              print_freq=10 ** 9)
    sentences = [dataset.ann[i]['sentence'] for i in out['index']]
    return accuracy_by_kind(sentences, out['pred'], out['target'], script.CLASS_NAMES,
                            nlvr_statement_kind if task == 'nlvr' else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', choices=('ve', 'nlvr'), required=True)
    parser.add_argument('--checkpoint', required=True, help='a fine-tuned VE.py / NLVR.py checkpoint')
    parser.add_argument('--config', default=None, help='its config (default: config.yaml beside it)')
    parser.add_argument('--split', choices=('train', 'val', 'test'), default='test')
    parser.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = parser.parse_args(argv)
    config_path = args.config or os.path.join(os.path.dirname(args.checkpoint), 'config.yaml')
    if missing_input(((args.checkpoint, '--checkpoint'), (config_path, '--config'))):
        return 2
    report = run(args.task, args.checkpoint, config_path, args.split)
    emit(report, args.json, f'{args.task} accuracy by sentence kind ({args.split} split)',
         ('sentences', 'items', 'accuracy %'), [(key, r['items'], r['accuracy']) for key, r in report.items()])
    return 0


if __name__ == '__main__':
    sys.exit(main())
