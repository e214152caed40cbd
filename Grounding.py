"""ALBEF weakly supervised visual grounding on RefCOCO+: fine-tune with the retrieval objectives (ITC + ITM) on
referring expressions, evaluate by Grad-CAM box selection among detection proposals.

    python -m torch.distributed.launch --nproc_per_node=8 --use_env Grounding.py --config configs/Grounding.yaml \
        --output_dir output/RefCOCO --gradcam_mode itm --block_num 8 --checkpoint ALBEF.pth
    python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --evaluate
    python Grounding.py --config configs/toy/Grounding.yaml --output_dir output/toy_grounding \
        --checkpoint output/toy_pretrain/checkpoint_last.pth

Outputs in output_dir: log.txt (per epoch train_* losses and val_d / testA_d / testB_d, fractions),
grounding_results.json (accuracies, counts, chance levels and proposal upper bound per split, best epoch),
result/epoch<E>.pth (the Grad-CAM maps), checkpoint_best.pth (best val_d) and checkpoint_last.pth.
"""
import argparse
import os
import sys

import engine
import utils
from dataset import create_dataset
from dataset.resumable import build_train_loader
from engine.steps import retrieval_step_fn
from models import gradcam
from evaluation.grounding import GroundingEvaluator, load_dets

# Grounding trains exactly like retrieval (idx = image index). A module attribute, so that tests can wrap it here.
make_step_fn = retrieval_step_fn

REQUIRED = ['train_file', 'test_file', 'image_root', 'refcoco_data', 'det_file', 'bert_config', 'image_res',
            'batch_size', 'optimizer', 'schedular']
# Grounding trains like retrieval: ITM draws the negative of each pair from the rest of the batch.
MIN_BATCH = {'batch_size': (2, 'for grounding training (ITM draws the negatives of each pair from the rest of the '
                               'batch)')}


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF grounding', parents=[
        utils.get_parent_parser('./configs/Grounding.yaml', 'output/RefCOCO')])
    parser.add_argument('--gradcam_mode', default='itm', choices=gradcam.MODES,
                        help='itm: ITM score on fusion cross-attention; itc: ITC similarity on ViT self-attention')
    parser.add_argument('--block_num', default=None, type=int,
                        help='layer whose attention is explained: a fusion (BERT) layer index for itm (default '
                             'fusion_layer + 2, i.e. 8 for bert-base), a ViT block index for itc (default 2*depth//3)')
    parser.add_argument('--gradcam_average', default='real', choices=gradcam.SENTENCE_AVERAGES,
                        help="sentence map = token maps averaged over real tokens, or over all padded positions "
                             "('padded', the original)")
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint')
    return utils.one_line_errors(parser)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.evaluate and not args.checkpoint:
        raise utils.UserError('--evaluate needs --checkpoint (a grounding, retrieval or pretraining checkpoint)')
    config, device = utils.prepare_run(args, required=REQUIRED, evaluate=args.evaluate,
                                       minimums={} if args.evaluate else MIN_BATCH)
    tokenizer = engine.build_tokenizer(config)
    train_ds, test_ds = create_dataset('grounding', config)
    from refTools.refer import REFER
    refer = REFER(config['refcoco_data'], 'refcoco+', 'unc')
    dets = load_dets(config['det_file'])
    model, model_without_ddp = engine.build_model('grounding', config, tokenizer, args, device,
                                                  resume=args.resume and not args.evaluate)
    num_workers = config.get('num_workers', 4)
    evaluator = GroundingEvaluator(
        model_without_ddp, test_ds, tokenizer, device, refer, dets, mode=args.gradcam_mode,
        block_num=args.block_num, sentence_average=args.gradcam_average,
        batch_size=config.get('batch_size_test', config['batch_size']), num_workers=num_workers,
        output_dir=args.output_dir, det_file=config['det_file'], resume=args.resume,
        print_freq=config.get('print_freq', 50))
    print(f'Grad-CAM: mode {args.gradcam_mode}, layer {evaluator.block_num}, '
          f'{len(test_ds)} expressions; chance (1 / mean proposals) '
          f'{evaluator.stats["all"]["chance_inv_mean_proposals"]:.3f}', flush=True)

    if args.evaluate:
        record = evaluator(0)
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), {**record, 'epoch': 0})
        return record

    loader = build_train_loader(train_ds, config['batch_size'], num_workers, args.seed)
    state = engine.train(args, config, model, model_without_ddp, loader, make_step_fn(tokenizer, device), device,
                         evaluate_fn=evaluator, best_metric='val_d', save_epoch_checkpoints=False)
    evaluator.finish(state.best_epoch)
    return evaluator.results.get('best')


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
