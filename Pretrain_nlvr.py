"""ALBEF text-assignment ("TA") pretraining for NLVR2: given a caption and two images, say which image it
describes (first, second, neither). Prepares the 18-layer-rule encoder that NLVR.py fine-tunes.

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --output_dir output/NLVR_pretrain --checkpoint ALBEF.pth
    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --output_dir output/NLVR_pretrain --checkpoint ALBEF.pth

--checkpoint is a pretraining checkpoint (ALBEF.pth, or Pretrain.py's checkpoint_XX.pth): the checkpoint loader
duplicates each of its fusion layers into two consecutive layers of the TA encoder. Outputs in output_dir:
checkpoint_XX.pth after every epoch (what NLVR.py takes), checkpoint_last.pth (resume point), log.txt.
"""
import argparse
import sys

import engine
# Imported for the config checks they declare (utils.config), which prepare_run applies to the config:
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from dataset import create_dataset
from dataset.resumable import build_train_loader
from engine.steps import caption_step_fn

MIN_BATCH = 3  # the "neither" label needs two images other than the caption's own


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF TA pretraining for NLVR2', parents=[
        utils.get_parent_parser('./configs/NLVR_pretrain.yaml', 'output/NLVR_pretrain')])
    return utils.one_line_errors(parser)


def make_step_fn(tokenizer, device, max_tokens=25):
    """Batch (images, captions) -> {'loss'}: the pretraining caption step without alpha (TA has no distillation)."""
    return caption_step_fn(tokenizer, device, max_tokens, pass_alpha=False)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config, device = utils.prepare_run(
        args, required=['train_file', 'bert_config', 'image_res', 'batch_size', 'optimizer', 'schedular'],
        minimums={'batch_size': (MIN_BATCH, 'for TA pretraining (a pair of two other images is drawn per caption)')})
    tokenizer = engine.build_tokenizer(config)
    dataset = create_dataset('nlvr_pretrain', config)
    loader = build_train_loader(dataset, config['batch_size'], config.get('num_workers', 4), args.seed)
    model, model_without_ddp = engine.build_model('pretrain_nlvr', config, tokenizer, args, device,
                                                  resume=args.resume)
    return engine.train(args, config, model, model_without_ddp, loader, make_step_fn(tokenizer, device), device,
                        alpha=0.0)  # TA has no distillation: alpha 0 whatever the config says


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
