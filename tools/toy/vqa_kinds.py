"""Toy VQA accuracy by question kind: which kinds of question keep a VQA run under its goal?

    python -m tools.toy.vqa_kinds --world data/toyworld --result output/toy_vqa/result/vqa_result.json
    python -m tools.toy.vqa_kinds ... --split train --result <answers to vqa_train.json> --json

The accuracy is the official VQA metric (vqaTools' VQAEval), with each question's type set to its toy kind
(`dataset.toyworld.vqa_question_kind`: colour / shape / size of an object named by its attributes or by its
position, count, exist, relation "is A to the left of B?", side "is A on the left or the right of B?").
`--split train` scores answers to the training questions, made by evaluating a fine-tuned checkpoint on them:

    python VQA.py --config configs/toy/VQA.yaml --checkpoint <run>/checkpoint_last.pth --evaluate \\
        --output_dir <dir> --opt "test_file=['data/toyworld/vqa_train.json']"

A kind far better on the training questions than on the test ones is memorised, not learnt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dataset.toyworld import VQA_QUESTION_KINDS, vqa_question_kind
from tools.toy.report import emit, missing_input


def kind_order(kind: str) -> tuple:
    """Table order: the generator's kinds, each followed by its 'by position' variant."""
    base = kind.replace(' by position', '')
    return VQA_QUESTION_KINDS.index(base) if base in VQA_QUESTION_KINDS else len(VQA_QUESTION_KINDS), kind


def accuracy_by_kind(items: list, result) -> dict:
    """{'overall', 'questions', 'kinds': {kind: {'questions', 'accuracy'}}} (accuracy in %) of `result` (a result
    file path or [{'question_id', 'answer'}]) on the VQA `items` (with 'answer' lists)."""
    from evaluation.vqa import GroundTruth, ground_truth_from_items
    annotations, questions = ground_truth_from_items(items)
    text = {q['question_id']: q['question'] for q in questions['questions']}
    counts: dict = {}
    for ann in annotations['annotations']:
        ann['question_type'] = vqa_question_kind(text[ann['question_id']])
        counts[ann['question_type']] = counts.get(ann['question_type'], 0) + 1
    score = GroundTruth(annotations, questions).score(result)
    kinds = {k: {'questions': counts[k], 'accuracy': score['perQuestionType'][k]}
             for k in sorted(counts, key=kind_order)}
    return {'overall': score['overall'], 'questions': score['questions'], 'kinds': kinds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', default='data/toyworld', help='toy world folder')
    parser.add_argument('--result', required=True, help='VQA result file [{"question_id", "answer"}]')
    parser.add_argument('--split', choices=('test', 'train'), default='test',
                        help='which questions the result answers (vqa_test.json or vqa_train.json)')
    parser.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = parser.parse_args(argv)
    items_path = os.path.join(args.world, f'vqa_{args.split}.json')
    if missing_input(((items_path, '--world'), (args.result, '--result'))):
        return 2
    with open(items_path) as f:
        items = json.load(f)
    report = accuracy_by_kind(items, args.result)
    rows = [(kind, r['questions'], r['accuracy']) for kind, r in report['kinds'].items()]
    emit(report, args.json, f'VQA accuracy by question kind ({args.split} split)', ('kind', 'questions', 'accuracy %'),
         rows + [('all', report['questions'], float(report['overall']))])
    return 0


if __name__ == '__main__':
    sys.exit(main())
