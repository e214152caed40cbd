"""ALBEF NLVR2 fine-tuning: is a statement true of an image pair? Train, then accuracy on val and test each epoch.

    python NLVR.py --config configs/NLVR.yaml --output_dir output/NLVR --checkpoint output/NLVR_pretrain/checkpoint_00.pth
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/NLVR --checkpoint ALBEF.pth
    python NLVR.py --config configs/NLVR.yaml --output_dir output/NLVR_eval --checkpoint output/NLVR/checkpoint_best.pth --evaluate

--checkpoint: a TA checkpoint (Pretrain_nlvr.py), or directly a pretraining checkpoint (its fusion layers are
duplicated into the 18-layer-rule encoder by the checkpoint loader), or with --evaluate a fine-tuned NLVR one.
Outputs in output_dir: log.txt (one JSON line per epoch: train loss/lr, val_acc, test_acc, per-class accuracies),
results.json (full metrics of every epoch and the best one), checkpoint_XX.pth after every epoch (the original wrote
one only when val accuracy improved; the file of the best epoch is the one it would have written last),
checkpoint_best.pth (best val accuracy) and checkpoint_last.pth (resume point).
"""
import functools
import sys

import torch

# Imported for the config checks they declare (utils.config), which prepare_run applies to the config:
import dataset  # noqa: F401
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from engine import classification, steps

CLASS_NAMES = ('False', 'True')  # label 0 / 1 of nlvr_dataset


def get_args_parser():
    return utils.one_line_errors(classification.get_args_parser('ALBEF NLVR2', './configs/NLVR.yaml', 'output/NLVR',
                                                                 'NLVR'))


def _inputs(batch, tokenizer, device, max_tokens):
    """(images = cat(first images, second images), input_ids, attention_mask, targets) on `device`."""
    image0, image1, sentences, targets = batch
    text = tokenizer(list(sentences), padding='longest', truncation=True, max_length=max_tokens,
                     return_tensors='pt')
    images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)
    return images, text.input_ids.to(device), text.attention_mask.to(device), targets.to(device)


# make_step_fn(tokenizer, device, max_tokens) and make_predict_fn(tokenizer, device, max_tokens, precision):
# the shared factories bound to this script's batch layout (`_inputs`). Module attributes, so that tests and
# callers can use or replace them here; main() looks them up at call time.
make_step_fn = functools.partial(steps.classification_step_fn, _inputs)
make_predict_fn = functools.partial(classification.make_predict_fn, _inputs)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config, device = utils.prepare_run(args, evaluate=args.evaluate, required=[
        'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size',
        'optimizer', 'schedular'])
    return classification.run_task('nlvr', args, config, device, class_names=CLASS_NAMES,
                                   train_batch_size=config['batch_size'], eval_batch_size=config['batch_size'],
                                   make_step_fn=make_step_fn, make_predict_fn=make_predict_fn,
                                   save_epoch_checkpoints=True)


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
