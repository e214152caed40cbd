"""ALBEF SNLI-VE fine-tuning: does the image entail, contradict, or say nothing about a hypothesis? Train, then
accuracy on val and test each epoch.

    python VE.py --config configs/VE.yaml --output_dir output/VE --checkpoint ALBEF.pth
    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --output_dir output/VE --checkpoint ALBEF.pth
    python VE.py --config configs/VE.yaml --output_dir output/VE_eval --checkpoint output/VE/checkpoint_best.pth --evaluate

Outputs in output_dir: log.txt (one JSON line per epoch: train loss/lr, val_acc, test_acc, per-class accuracies,
then the best epoch), results.json (full metrics of every epoch and of the best one), checkpoint_best.pth (best
val accuracy) and checkpoint_last.pth (resume point). Fix: the original never updated its best epoch, so its
final "best epoch" line always read 0; here the epoch of checkpoint_best.pth is reported.
"""
import functools
import sys

# Imported for the config checks they declare (utils.config), which prepare_run applies to the config:
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from dataset.ve_dataset import LABELS
from engine import classification, steps

CLASS_NAMES = tuple(sorted(LABELS, key=LABELS.get))  # contradiction 0, neutral 1, entailment 2


def get_args_parser():
    return utils.one_line_errors(classification.get_args_parser('ALBEF SNLI-VE', './configs/VE.yaml', 'output/VE',
                                                                 'VE'))


def _inputs(batch, tokenizer, device, max_tokens):
    """(images, input_ids, attention_mask, targets) on `device`."""
    images, sentences, targets = batch
    text = tokenizer(list(sentences), padding='longest', truncation=True, max_length=max_tokens,
                     return_tensors='pt')
    return (images.to(device, non_blocking=True), text.input_ids.to(device), text.attention_mask.to(device),
            targets.to(device))


# make_step_fn(tokenizer, device, max_tokens) and make_predict_fn(tokenizer, device, max_tokens, precision):
# the shared factories bound to this script's batch layout (`_inputs`). Module attributes, so that tests and
# callers can use or replace them here; main() looks them up at call time.
make_step_fn = functools.partial(steps.classification_step_fn, _inputs)
make_predict_fn = functools.partial(classification.make_predict_fn, _inputs)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config, device = utils.prepare_run(args, evaluate=args.evaluate, required=[
        'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size_train',
        'batch_size_test', 'optimizer', 'schedular'])
    return classification.run_task('ve', args, config, device, class_names=CLASS_NAMES,
                                   train_batch_size=config['batch_size_train'],
                                   eval_batch_size=config['batch_size_test'],
                                   make_step_fn=make_step_fn, make_predict_fn=make_predict_fn,
                                   save_epoch_checkpoints=False)


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
