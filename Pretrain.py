"""ALBEF pretraining: image-text contrastive (ITC), image-text matching (ITM) and masked language modelling (MLM).

    python Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
    python Pretrain.py --config configs/toy/Pretrain.yaml --output_dir output/toy_pretrain
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


# ITM draws the negative of each pair from the other pairs of the batch (so does ITC's in-batch contrast).
MIN_BATCH = {'batch_size': (2, 'for pretraining (ITM draws the negatives of each pair from the rest of the batch)')}


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF pretraining', parents=[
        utils.get_parent_parser('./configs/Pretrain.yaml', 'output/Pretrain')])
    return utils.one_line_errors(parser)


# Batch (images, captions) -> ITC, ITM and MLM losses. A module attribute, so that tests can wrap it here.
make_step_fn = caption_step_fn


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config, device = utils.prepare_run(args, required=['train_file', 'bert_config', 'image_res', 'batch_size',
                                                       'optimizer', 'schedular'], minimums=MIN_BATCH)
    tokenizer = engine.build_tokenizer(config)
    dataset = create_dataset('pretrain', config)
    loader = build_train_loader(dataset, config['batch_size'], config.get('num_workers', 4), args.seed)
    model, model_without_ddp = engine.build_model('pretrain', config, tokenizer, args, device, resume=args.resume)
    engine.train(args, config, model, model_without_ddp, loader, make_step_fn(tokenizer, device), device)


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
