"""ALBEF image-text retrieval (COCO / Flickr30k): fine-tune with ITC + ITM, evaluate R@K with ITM re-ranking.

    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_flickr.yaml --output_dir output/Retrieval_flickr --checkpoint ALBEF.pth
    python Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --evaluate
    python Retrieval.py --config configs/toy/Retrieval.yaml --output_dir output/toy_retrieval --checkpoint output/toy_pretrain/checkpoint_last.pth
    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --evaluate --score itc --opt image_res=256

--checkpoint: a pretraining checkpoint (fine-tuning start, or --score itc zero-shot) or a retrieval one (resume
by hand, or --evaluate); a checkpoint of another variant is refused by the loader. Evaluation (every epoch, on val
and test): ITC top-k_test candidates re-scored by the ITM head (evaluation/retrieval.py: --score itm | itm+itc |
itc, --itm_batch_size, --image_states).
Outputs in output_dir: log.txt (per epoch: train_lr, train_loss_ita, train_loss_itm, val_txt_r1 ... test_r_mean),
retrieval_test_metrics.json (every evaluation and the best epoch's val/test metrics), checkpoint_best.pth (best val
r_mean), checkpoint_last.pth (resume point).
"""
import argparse
import os
import sys

import engine
# Imported for the config checks they declare (utils.config), which prepare_run applies to the config:
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from dataset import DataError, create_dataset, create_loader
from dataset.resumable import build_train_loader
from engine.steps import retrieval_step_fn
from evaluation.retrieval import IMAGE_STATE_PLACES, SCORE_MODES, RetrievalEvaluator

# ITM draws the negative of each pair from the other pairs (of other images) of the batch.
MIN_BATCH = {'batch_size_train': (2, 'for retrieval training (ITM draws the negatives of each pair from the rest of '
                                     'the batch)')}


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF retrieval', parents=[
        utils.get_parent_parser('./configs/Retrieval_flickr.yaml', 'output/Retrieval_flickr')])
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint on val and test')
    parser.add_argument('--score', choices=SCORE_MODES, default=None,
                        help="ranking score (default: config 'score', else itm): itm = ITM logit of the top-k "
                             "(ALBEF), itm+itc = logit + ITC similarity (BLIP), itc = similarity only (zero-shot)")
    parser.add_argument('--k_test', type=utils.config_flag('k_test'), default=None,
                        help="candidates re-ranked per query (config k_test)")
    parser.add_argument('--itm_batch_size', type=utils.config_flag('itm_batch_size'), default=None,
                        help='(image, text) pairs per fusion call in evaluation (config itm_batch_size, else 1024)')
    parser.add_argument('--image_states', choices=IMAGE_STATE_PLACES, default='auto',
                        help='where evaluation keeps the ViT states: device, cpu (offload), auto (cpu if large)')
    return utils.one_line_errors(parser)


# Batch (images, captions, image indices) -> {'loss_ita', 'loss_itm'}. A module attribute, so that tests can use
# or wrap it here.
make_step_fn = retrieval_step_fn


def check_image_ids(train_set) -> None:
    """Each image_id must name one image and each image have one image_id across all train files: the ids
    decide which captions are ITC positives of each other, so a mismatch silently corrupts the targets."""
    image_of, id_of = {}, {}
    for n, ann in enumerate(train_set.ann):
        image, image_id = ann['image'], ann['image_id']
        first = image_of.setdefault(image_id, (image, n))
        if first[0] != image:
            raise DataError(f"{train_set.ann.where(n)}: image_id {image_id!r} is given to image {image!r}, but "
                            f"{train_set.ann.where(first[1])} gives it to {first[0]!r}")
        first = id_of.setdefault(image, (image_id, n))
        if first[0] != image_id:
            raise DataError(f"{train_set.ann.where(n)}: image {image!r} has image_id {image_id!r}, but "
                            f"{train_set.ann.where(first[1])} gives it image_id {first[0]!r}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for key in ('score', 'k_test', 'itm_batch_size'):  # flags override the config (validated with it)
        if getattr(args, key) is not None:
            args.opt.append(f'{key}={getattr(args, key)}')
    if args.evaluate and not args.checkpoint:
        raise utils.UserError('--evaluate needs --checkpoint (a retrieval, or for --score itc a pretraining, '
                              'checkpoint)')
    config, device = utils.prepare_run(args, evaluate=args.evaluate, required=[
        'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size_train',
        'batch_size_test', 'k_test', 'optimizer', 'schedular'], minimums={} if args.evaluate else MIN_BATCH)
    tokenizer = engine.build_tokenizer(config)
    train_set, val_set, test_set = create_dataset('re', config)
    check_image_ids(train_set)
    workers = config.get('num_workers', 4)
    # As the original: no sampler for val/test, every rank encodes the whole set; the re-ranking is split.
    val_loader, test_loader = create_loader([val_set, test_set], [None, None], [config['batch_size_test']] * 2,
                                            [workers] * 2, [False, False], [None, None])
    model, model_without_ddp = engine.build_model('retrieval', config, tokenizer, args, device,
                                                  resume=args.resume and not args.evaluate)
    evaluator = RetrievalEvaluator(
        model_without_ddp, {'val': val_loader, 'test': test_loader}, tokenizer, device,
        k_test=config['k_test'], score=config.get('score', 'itm'), precision=config.get('precision', 'fp32'),
        itm_batch_size=config.get('itm_batch_size', 1024), image_states=args.image_states,
        results_path=os.path.join(args.output_dir, 'retrieval_test_metrics.json'), resume=args.resume,
        extra={'checkpoint': args.checkpoint, 'image_res': config['image_res']})
    if args.evaluate:
        record = evaluator.record(evaluator.run('evaluate'))
        evaluator.finish('evaluate')
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'log.txt'),
                                   {**record, 'epoch': 0, 'checkpoint': args.checkpoint})
        return record

    loader = build_train_loader(train_set, config['batch_size_train'], workers, args.seed)
    step_fn = make_step_fn(tokenizer, device,
                           position_limit=model_without_ddp.text_encoder.config.max_position_embeddings)
    state = engine.train(args, config, model, model_without_ddp, loader, step_fn, device,
                         evaluate_fn=evaluator, best_metric='val_r_mean', save_epoch_checkpoints=False)
    evaluator.finish(state.best_epoch)
    print(f'best epoch: {state.best_epoch}', flush=True)
    return state


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
