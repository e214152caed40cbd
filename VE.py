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
import argparse
import os
import sys

import engine
import utils
from dataset import create_dataset
from dataset.resumable import build_train_loader
from dataset.ve_dataset import LABELS
from evaluation.classification import EpochEvaluator, build_eval_loaders, load_for_evaluation

CLASS_NAMES = tuple(sorted(LABELS, key=LABELS.get))  # contradiction 0, neutral 1, entailment 2


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF SNLI-VE', parents=[
        utils.get_parent_parser('./configs/VE.yaml', 'output/VE')])
    parser.add_argument('--evaluate', action='store_true',
                        help='only evaluate --checkpoint (a fine-tuned VE checkpoint) on val and test')
    parser.add_argument('--save_every_steps', default=0, type=int,
                        help='also write checkpoint_last.pth every N steps within an epoch (exact resume)')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='cut epochs short (smoke tests)')
    return parser


def _inputs(batch, tokenizer, device, max_tokens):
    """(images, input_ids, attention_mask, targets) on `device`."""
    images, sentences, targets = batch
    text = tokenizer(list(sentences), padding='longest', truncation=True, max_length=max_tokens,
                     return_tensors='pt')
    return (images.to(device, non_blocking=True), text.input_ids.to(device), text.attention_mask.to(device),
            targets.to(device))


def make_step_fn(tokenizer, device, max_tokens):
    """Batch (images, hypotheses, labels) -> {'loss'} (classification CE with distillation)."""
    def step(model, batch, alpha):
        images, ids, mask, targets = _inputs(batch, tokenizer, device, max_tokens)
        return model(images, ids, mask, targets, alpha=alpha)
    return step


def make_predict_fn(tokenizer, device, max_tokens, precision):
    """(model, batch) -> (logits [B, 3], targets) for the shared classification evaluator."""
    def predict(model, batch):
        images, ids, mask, targets = _inputs(batch, tokenizer, device, max_tokens)
        with engine.autocast(device, precision):
            return model.predict(images, ids, mask).float(), targets
    return predict


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config, device = utils.prepare_run(args, evaluate=args.evaluate, required=[
        'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size_train',
        'batch_size_test', 'optimizer', 'schedular'])
    tokenizer = engine.build_tokenizer(config)
    train_set, val_set, test_set = create_dataset('ve', config)
    workers = config.get('num_workers', 4)
    val_loader, test_loader = build_eval_loaders([val_set, test_set], config['batch_size_test'], workers)
    if args.evaluate:
        model = model_without_ddp = load_for_evaluation('ve', config, tokenizer, args, device)
    else:
        model, model_without_ddp = engine.build_model('ve', config, tokenizer, args, device, resume=args.resume)
    max_tokens = model_without_ddp.text_encoder.config.max_position_embeddings
    predict_fn = make_predict_fn(tokenizer, device, max_tokens, config.get('precision', 'fp32'))
    evaluator = EpochEvaluator(model_without_ddp, {'val': val_loader, 'test': test_loader}, predict_fn,
                               CLASS_NAMES, os.path.join(args.output_dir, 'results.json'), resume=args.resume,
                               print_freq=config.get('print_freq', 50))
    if args.evaluate:
        record = evaluator.record(evaluator.run('evaluate'))
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), {**record, 'checkpoint': args.checkpoint})
        return record

    loader = build_train_loader(train_set, config['batch_size_train'], workers, args.seed)
    optimizer, lr_scheduler, num_epochs = engine.build_optimizer_and_scheduler(config, model_without_ddp)
    state = engine.resume_training(args, config, model_without_ddp, optimizer, lr_scheduler)
    state = engine.fit(model=model, model_without_ddp=model_without_ddp, train_loader=loader, optimizer=optimizer,
                       scheduler=lr_scheduler, step_fn=make_step_fn(tokenizer, device, max_tokens), config=config,
                       engine_cfg=engine.engine_config(config, save_every_steps=args.save_every_steps,
                                                       max_steps_per_epoch=args.max_steps_per_epoch),
                       device=device, output_dir=args.output_dir, num_epochs=num_epochs, state=state,
                       evaluate_fn=evaluator, best_metric='val_acc', save_epoch_checkpoints=False)
    evaluator.finish(state.best_epoch)
    print(f'best epoch: {state.best_epoch}', flush=True)
    return state


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
