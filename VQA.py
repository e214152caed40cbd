"""ALBEF VQA fine-tuning: a question encoder over the image and an answer decoder; answers are ranked from a fixed
candidate list. Train, then answer the test split once.

    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint ALBEF.pth
    python VQA.py --config configs/VQA.yaml --output_dir output/vqa_eval --checkpoint output/vqa/checkpoint_07.pth --evaluate
    python VQA.py --config configs/toy/VQA.yaml --output_dir output/toy_vqa --checkpoint output/toy_pretrain/checkpoint_last.pth

--checkpoint: a pretraining checkpoint (the loader initialises the answer decoder from the encoder's fusion
layers and its head from the MLM head, as the original does), or with --evaluate a fine-tuned VQA checkpoint.
Outputs in output_dir: checkpoint_XX.pth after every epoch (as the original) and checkpoint_last.pth (resume point);
log.txt (one JSON line per epoch, then one for the test split); result/vqa_result_epochE.json and
result/vqa_result.json, the answers as [{"question_id", "answer"}] (the evaluation server's format; E = the last
epoch, 0 with --evaluate as the original; --eval_every_epoch writes one per epoch), every test question exactly
once. When the test split has ground truth
(--test_annotations/--test_questions in the official format, or 'answer' lists in the test items as in a val split
or the toy world), the accuracy (vqaTools' VQAEval) goes to log.txt and vqa_accuracy.json, next to two blind
baselines (the most frequent answer; the most frequent answer of the same question text).
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
from dataset import create_dataset, vqa_collate_fn
from dataset.resumable import build_train_loader
from evaluation.common import build_eval_loaders
from evaluation.vqa import VQAEvaluator, answer_coverage, check_question_ids, report_coverage

QUESTION_TOKENS = 25  # training questions: padding longest, truncation, max_length 25 (as the original's VQA.py)


def get_args_parser():
    parser = argparse.ArgumentParser('ALBEF VQA', parents=[utils.get_parent_parser('./configs/VQA.yaml',
                                                                                   'output/vqa')])
    parser.add_argument('--evaluate', action='store_true',
                        help='only answer the test split with --checkpoint (a fine-tuned VQA checkpoint)')
    parser.add_argument('--text_decoder', default=None,
                        help='BERT weights for the answer decoder when no --checkpoint is given (default: config)')
    parser.add_argument('--test_annotations', default=None, type=utils.input_file,
                        help='official VQA annotation file of the test split, to compute accuracy')
    parser.add_argument('--test_questions', default=None, type=utils.input_file,
                        help='official VQA question file of the test split')
    parser.add_argument('--eval_every_epoch', action='store_true',
                        help='answer (and score) the test split after every epoch, not only after the last')
    return utils.one_line_errors(parser)


def make_step_fn(tokenizer, device, answer_tokens=None):
    """Batch (images, questions, answers, weights, n) -> {'loss'}: the weighted, distilled answer NLL.

    Answers already end with the eos string ("yes[SEP]"), so padding them gives "[CLS] answer [SEP] [PAD]...";
    they are cut only at `answer_tokens` (the model's position limit), which the original never needs.
    """
    def step(model, batch, alpha):
        images, questions, answers, weights, n = batch
        q = tokenizer(list(questions), padding='longest', truncation=True, max_length=QUESTION_TOKENS,
                      return_tensors='pt')
        a = tokenizer(list(answers), padding='longest', truncation=answer_tokens is not None,
                      max_length=answer_tokens, return_tensors='pt')
        return model(images.to(device, non_blocking=True), q.input_ids.to(device), q.attention_mask.to(device),
                     a.input_ids.to(device), a.attention_mask.to(device), weights.to(device), n, alpha=alpha)
    return step


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if (args.test_annotations is None) != (args.test_questions is None):  # checked again by VQAEvaluator
        raise utils.UserError('give both --test_annotations and --test_questions (official VQA files), or neither')
    config, device = utils.prepare_run(args, evaluate=args.evaluate, required=[  # (sets --text_decoder too)
        'train_file', 'test_file', 'answer_list', 'vqa_root', 'bert_config', 'image_res', 'batch_size_train',
        'batch_size_test', 'optimizer', 'schedular'])
    tokenizer = engine.build_tokenizer(config)
    train_set, test_set = create_dataset('vqa', config)
    check_question_ids(test_set)
    if utils.is_main_process():
        report_coverage('train_file', answer_coverage(train_set.ann, test_set.answer_list))
    workers = config.get('num_workers', 4)
    test_loader = build_eval_loaders([test_set], config['batch_size_test'], workers)[0]
    if args.evaluate:
        model = model_without_ddp = engine.load_for_evaluation('vqa', config, tokenizer, args, device)
    else:
        model, model_without_ddp = engine.build_model('vqa', config, tokenizer, args, device, resume=args.resume)
    max_tokens = model_without_ddp.text_encoder.config.max_position_embeddings
    evaluator = VQAEvaluator(model_without_ddp, test_loader, tokenizer, device, config, args.output_dir,
                             train_items=train_set.ann, annotation_file=args.test_annotations,
                             question_file=args.test_questions, max_tokens=max_tokens)
    log_path = os.path.join(args.output_dir, 'log.txt')

    last_epoch, evaluated = 0, {}

    def evaluate_epoch(epoch):
        evaluated[epoch] = evaluator.run(f'vqa_result_epoch{epoch}')
        return evaluated[epoch]

    if not args.evaluate:
        loader = build_train_loader(train_set, config['batch_size_train'], workers, args.seed,
                                    collate_fn=vqa_collate_fn)
        state = engine.train(args, config, model, model_without_ddp, loader,
                             make_step_fn(tokenizer, device, max_tokens), device,
                             evaluate_fn=evaluate_epoch if args.eval_every_epoch else None,
                             save_epoch_checkpoints=True)
        last_epoch = state.epoch - 1
        if last_epoch in evaluated:  # --eval_every_epoch already answered (and logged) the last epoch
            return {**evaluated[last_epoch], 'epoch': last_epoch}
    record = evaluate_epoch(last_epoch)
    record['epoch'] = last_epoch
    if args.evaluate:
        record['checkpoint'] = args.checkpoint
    if utils.is_main_process():
        utils.append_json_line(log_path, record)
    return record


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
