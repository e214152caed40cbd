"""VQA evaluation: rank the candidate answer list for every test question, write the result file in the
official server format, and score it with vqaTools when the split has ground-truth answers.

Pieces, from low to high level:

* `candidate_tensors` - the answer list plus eos, tokenized once ("[CLS] answer [SEP]" rows);
* `clamp_k` - k_test limited to the number of candidates (with a warning);
* `check_question_ids` / `answer_coverage` - start-up checks of the data: unique test question ids, and how many
  ground-truth answers the answer list cannot produce (counted and reported, never fatal);
* `predict_answers` - this rank's (dataset index, question_id, answer) for a loader;
* `merge_results` - the union over ranks, each question once (DistributedSampler's padded repeats dropped), in
  dataset order, as [{"question_id", "answer"}];
* `save_result` - write `<result_dir>/<name>.json` (rank 0, atomically);
* `GroundTruth` / `blind_baselines` - accuracy with vqaTools' VQA + VQAEval against the official
  question/annotation files, or against ground truth built from the test items' own 'answer' lists; and two
  answerers that do not look at the image (the most frequent training answer; the most frequent training answer
  of the same question text) to read the model's accuracy against;
* `VQAEvaluator` - what VQA.py calls after training (or with --evaluate).

Ranking is model_vqa's `rank_answer`, batched over the questions of a test batch and kept exactly as the original
(including the first answer token's log-probability counted twice, so released checkpoints score as
published).

Differences from the original: results are gathered in memory across ranks and each question_id is written once
(the original's merged file repeats the questions that the sampler padded), so no per-rank files are
written; accuracy is computed offline whenever ground truth is available (the original leaves scoring to the
evaluation server).
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter, defaultdict
from typing import Mapping, Sequence

import torch

import utils
from dataset.utils import DataError, pre_question
from evaluation.common import batch_indices, merge_shards, write_json


class KTestWarning(UserWarning):
    """k_test asked for more candidates than the answer list holds."""


# ----------------------------------------------------------------------------------------------------------------
# Candidates and start-up checks
# ----------------------------------------------------------------------------------------------------------------
def candidate_tensors(answer_list: Sequence[str], eos: str, tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask [Na, La] of every candidate "answer + eos" (padding longest), as the original: with the
    default eos '[SEP]' each row is "[CLS] answer-pieces [SEP] [PAD]...", whose column 1 is the first answer
    token that rank_answer's first decoding step scores."""
    enc = tokenizer([a + eos for a in answer_list], padding='longest', return_tensors='pt')
    if enc.input_ids.size(1) < 2:
        raise DataError('answer_list: every candidate tokenizes to [CLS] only (empty answers and empty eos); '
                        'rank_answer needs at least one answer token per candidate')
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def clamp_k(k: int, n_candidates: int) -> int:
    """k_test limited to the number of candidates; warns (KTestWarning) when it had to be lowered."""
    if k > n_candidates:
        warnings.warn(f'k_test {k} is larger than the answer list ({n_candidates} candidates); using k_test '
                      f'{n_candidates}', KTestWarning, stacklevel=2)
        return n_candidates
    return k


def check_question_ids(dataset) -> None:
    """Refuse a test file where two items share a question_id (the result file would be ambiguous); the error
    names both items."""
    first: dict = {}
    for i, item in enumerate(dataset.ann):
        qid = item['question_id']
        if qid in first:
            raise DataError(f'{dataset.ann.where(i)}: question_id {qid!r} repeats {dataset.ann.where(first[qid])}')
        first[qid] = i


def _answers_of(item: Mapping) -> list[str]:
    """The human answers of an annotation item: the list ('vqa') or the single string ('vg')."""
    ans = item.get('answer')
    if ans is None:
        return []
    return [ans] if isinstance(ans, str) else list(ans)


def answer_coverage(annotations, answer_list: Sequence[str], examples: int = 5) -> dict:
    """How much of the annotated answers the candidate list can produce.

    Returns {'questions', 'answers' (occurrences), 'missing_answers' (occurrences not in the list),
    'missing_distinct', 'unanswerable_questions' (no answer of theirs is in the list: never answered right),
    'most_common_missing' [[answer, count], ...]}. Answers outside the list still train the decoder; they just
    can never be predicted.
    """
    in_list = set(answer_list)
    missing: Counter = Counter()
    n_q = n_a = unanswerable = 0
    for item in annotations:
        answers = _answers_of(item)
        if not answers:
            continue
        n_q += 1
        n_a += len(answers)
        out = [a for a in answers if a not in in_list]
        missing.update(out)
        unanswerable += len(out) == len(answers)
    return {'questions': n_q, 'answers': n_a, 'missing_answers': sum(missing.values()),
            'missing_distinct': len(missing), 'unanswerable_questions': unanswerable,
            'most_common_missing': [[a, c] for a, c in missing.most_common(examples)]}


def report_coverage(name: str, coverage: Mapping) -> None:
    """Print one line about answers outside the answer list (nothing when all are covered)."""
    if coverage['missing_answers'] == 0:
        return
    examples = ', '.join(f'{a!r} x{c}' for a, c in coverage['most_common_missing'])
    print(f'note: {name}: {coverage["missing_answers"]} of {coverage["answers"]} answers '
          f'({coverage["missing_distinct"]} distinct, e.g. {examples}) are not in answer_list; '
          f'{coverage["unanswerable_questions"]} of {coverage["questions"]} questions have no answer in it and '
          f'can never be answered right', flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Prediction and result files
# ----------------------------------------------------------------------------------------------------------------
def _as_list(values) -> list:
    return values.tolist() if torch.is_tensor(values) else list(values)


@torch.no_grad()
def predict_answers(model, loader, tokenizer, device, answer_list: Sequence[str], cand_ids: torch.Tensor,
                    cand_atts: torch.Tensor, k: int, *, max_tokens: int | None = None, precision: str = 'fp32',
                    header: str = 'VQA test', print_freq: int = 50) -> dict[str, list]:
    """This rank's answers for `loader` (test items (image, question, question_id)).

    Questions are tokenized with padding 'longest' (truncated only at `max_tokens`, the model's position limit;
    the original does not truncate test questions). Each question's answer is the candidate with the largest
    re-ranked probability. Returns {'index': dataset indices, 'question_id', 'answer'}.
    """
    index_batches = batch_indices(loader)
    k = clamp_k(k, cand_ids.size(0))
    was_training = model.training
    model.eval()
    out: dict[str, list] = {'index': [], 'question_id': [], 'answer': []}
    logger = utils.MetricLogger(window_size=50)
    try:
        for indices, (images, questions, qids) in logger.log_every(zip(index_batches, loader), print_freq,
                                                                   header, total=len(index_batches)):
            q = tokenizer(list(questions), padding='longest', truncation=max_tokens is not None,
                          max_length=max_tokens, return_tensors='pt')
            with utils.autocast(device, precision):
                topk_ids, topk_probs = model.predict(images.to(device, non_blocking=True), q.input_ids.to(device),
                                                     q.attention_mask.to(device), cand_ids, cand_atts, k)
            best = topk_ids.gather(1, topk_probs.argmax(dim=1, keepdim=True)).squeeze(1).tolist()
            out['index'] += indices
            out['question_id'] += _as_list(qids)
            out['answer'] += [answer_list[b] for b in best]
    finally:
        model.train(was_training)
    return out


def merge_results(shards: Sequence[Mapping[str, Sequence]]) -> list[dict]:
    """[{"question_id", "answer"}] with every question once (its first occurrence), in dataset order.

    DistributedSampler pads the last shards with repeats of the first items; those repeats are dropped here
    (`merge_shards`; question ids are unique per test file, `check_question_ids`).
    """
    merged = merge_shards(shards, ('question_id', 'answer'))
    return [{'question_id': qid, 'answer': answer} for qid, answer in zip(merged['question_id'], merged['answer'])]


def save_result(result: Sequence[Mapping], result_dir: str, name: str) -> str:
    """Write `result` as `<result_dir>/<name>.json` (a JSON list, the server's format) on rank 0; returns the path."""
    path = os.path.join(result_dir, f'{name}.json')
    if utils.is_main_process():
        utils.atomic_write_text(path, json.dumps(list(result)))
    return path


def collect_results(model, loader, tokenizer, device, answer_list, cand_ids, cand_atts, k, **kwargs) -> list[dict]:
    """`predict_answers` on every rank, gathered and merged; checks that every test question got one answer."""
    local = predict_answers(model, loader, tokenizer, device, answer_list, cand_ids, cand_atts, k, **kwargs)
    result = merge_results(utils.all_gather_object(local))
    expected = len(loader.dataset)
    if len(result) != expected:
        raise RuntimeError(f'VQA evaluation: answers for {len(result)} of {expected} test questions')
    return result


# ----------------------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------------------
_NUMBER_WORDS = {'none', 'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten'}


def _answer_type(answers: Sequence[str]) -> str:
    """The VQA answer type of a question from its most common answer: 'yes/no', 'number' or 'other'."""
    top = Counter(answers).most_common(1)[0][0].strip().lower()
    if top in ('yes', 'no'):
        return 'yes/no'
    if top.isdigit() or top in _NUMBER_WORDS:
        return 'number'
    return 'other'


def ground_truth_from_items(items: Sequence[Mapping], where: str = 'test_file') -> tuple[dict, dict]:
    """Official-format (annotations, questions) dicts built from test items that carry 'answer'.

    A list answer is used as the human answers; a single string answer counts as ten identical answers (so the
    accuracy is exact match). question_type is 'unknown' (the items do not say); answer_type is derived from the
    most common answer. Items without 'answer' are left out.
    """
    anns, ques = [], []
    for item in items:
        answers = _answers_of(item)
        if not answers:
            continue
        if isinstance(item.get('answer'), str):
            answers = answers * 10
        qid = item['question_id']
        image_id = os.path.splitext(os.path.basename(str(item.get('image', ''))))[0]
        anns.append({'question_id': qid, 'image_id': image_id, 'question_type': 'unknown',
                     'answer_type': _answer_type(answers),
                     'multiple_choice_answer': Counter(answers).most_common(1)[0][0],
                     'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j + 1}
                                 for j, a in enumerate(answers)]})
        ques.append({'question_id': qid, 'image_id': image_id, 'question': item['question']})
    if not anns:
        raise DataError(f'{where}: no test item carries an answer, cannot compute accuracy')
    header = {'info': {'description': f'ground truth built from the answers in {where}'},
              'task_type': 'Open-Ended', 'data_type': 'unknown', 'data_subtype': 'unknown', 'license': {}}
    return dict(header, annotations=anns), dict(header, questions=ques)


class GroundTruth:
    """Official-format ground truth indexed once by vqaTools' `VQA`, scoring any number of result lists.

    `GroundTruth(annotation_file, question_file)` reads official files (paths or loaded dicts);
    `GroundTruth.from_items(items)` builds them from test items that carry answers (`ground_truth_from_items`).
    """

    def __init__(self, annotations, questions):
        from vqaTools.vqa import VQA
        self.questions = questions
        self.vqa = VQA(annotations, questions)
        self.question_ids = set(self.vqa.getQuesIds())

    @classmethod
    def from_items(cls, items: Sequence[Mapping], where: str = 'test_file') -> 'GroundTruth':
        return cls(*ground_truth_from_items(items, where))

    def score(self, result: Sequence[Mapping], n: int = 2) -> dict:
        """VQA accuracy of `result` ([{'question_id', 'answer'}] or a result file path): {'overall',
        'perQuestionType', 'perAnswerType'} in percent (n decimals, as VQAEval) and 'questions'. The result must
        answer exactly the ground truth's questions; missing, unknown or duplicated ids raise vqaTools.VQAError
        naming them."""
        from vqaTools.vqaEval import VQAEval
        res = result if isinstance(result, (str, os.PathLike)) else list(result)
        evaluator = VQAEval(self.vqa, self.vqa.loadRes(res, self.questions), n=n)
        evaluator.evaluate()
        acc = evaluator.accuracy
        return {'overall': acc['overall'], 'perQuestionType': dict(acc['perQuestionType']),
                'perAnswerType': dict(acc['perAnswerType']), 'questions': len(self.question_ids)}


def blind_baselines(train_items: Sequence[Mapping], test_items: Sequence[Mapping],
                    answer_list: Sequence[str]) -> dict[str, list[dict]]:
    """Result lists of two answerers that never look at the image, to read the model's accuracy against.

    'most_frequent': every question gets the answer-list entry with the most training answer weight (an
    answer's weight in a question is its share of that question's human answers).
    'question_prior': the same, restricted to training questions with the same normalised text (falling back to
    'most_frequent' for unseen questions): what a language-only model could reach.
    """
    in_list = set(answer_list)
    total: Counter = Counter()
    by_question: dict[str, Counter] = defaultdict(Counter)
    for item in train_items:
        answers = _answers_of(item)
        if not answers:
            continue
        share = 1.0 / len(answers)
        key = pre_question(item['question'], 50)
        for a in answers:
            if a in in_list:
                total[a] += share
                by_question[key][a] += share
    order = {a: i for i, a in enumerate(answer_list)}  # ties broken by answer-list order: deterministic

    def best(counter: Counter) -> str:
        return min(counter, key=lambda a: (-counter[a], order[a]))

    top = best(total) if total else answer_list[0]
    most, prior = [], []
    for item in test_items:
        key = pre_question(item['question'], 50)
        most.append({'question_id': item['question_id'], 'answer': top})
        prior.append({'question_id': item['question_id'],
                      'answer': best(by_question[key]) if key in by_question else top})
    return {'most_frequent': most, 'question_prior': prior}


# ----------------------------------------------------------------------------------------------------------------
# What VQA.py calls
# ----------------------------------------------------------------------------------------------------------------
class VQAEvaluator:
    """Answer the test split, write the result files and, when ground truth exists, score them.

    Ground truth: `annotation_file` + `question_file` (official VQA format) when given; otherwise the test items'
    own 'answer' lists (the toy world's test items and a VQA val split carry them; items without answers are
    left out of the score); otherwise none (a real test split: submit the result file to the evaluation server).
    """

    def __init__(self, model, loader, tokenizer, device, config: Mapping, output_dir: str, *,
                 train_items: Sequence[Mapping] = (), annotation_file: str | None = None,
                 question_file: str | None = None, max_tokens: int | None = None):
        if (annotation_file is None) != (question_file is None):
            raise utils.UserError('give both --test_annotations and --test_questions (official VQA files), or '
                                  'neither')
        self.model, self.loader, self.tokenizer, self.device = model, loader, tokenizer, device
        self.output_dir = output_dir
        self.result_dir = os.path.join(output_dir, 'result')
        os.makedirs(self.result_dir, exist_ok=True)
        dataset = loader.dataset
        self.answer_list = list(dataset.answer_list)
        self.k = clamp_k(int(config.get('k_test', 128)), len(self.answer_list))
        self.cand_ids, self.cand_atts = candidate_tensors(self.answer_list, config.get('eos', '[SEP]'), tokenizer,
                                                          device)
        self.precision = config.get('precision', 'fp32')
        self.print_freq = int(config.get('print_freq', 50))
        self.max_tokens = max_tokens
        self.train_items = train_items
        self.test_items = list(dataset.ann)
        self.annotation_file, self.question_file = annotation_file, question_file
        self.has_gt = annotation_file is not None or any(_answers_of(it) for it in self.test_items)
        self._gt: GroundTruth | None = None

    def ground_truth(self) -> GroundTruth:
        """The ground truth (loaded on first use)."""
        if self._gt is None:
            if self.annotation_file is not None:
                self._gt = GroundTruth(self.annotation_file, self.question_file)
            else:
                self._gt = GroundTruth.from_items(self.test_items)
        return self._gt

    def run(self, name: str) -> dict:
        """Answer every test question and write result/<name>.json and result/vqa_result.json (the same list);
        with ground truth also score it (vqa_accuracy.json). Returns the log.txt record."""
        result = collect_results(self.model, self.loader, self.tokenizer, self.device, self.answer_list,
                                 self.cand_ids, self.cand_atts, self.k, max_tokens=self.max_tokens,
                                 precision=self.precision, print_freq=self.print_freq)
        path = save_result(result, self.result_dir, name)
        save_result(result, self.result_dir, 'vqa_result')
        utils.barrier()
        print(f'wrote {len(result)} answers to {path}', flush=True)
        record: dict = {'result_file': path, 'test_questions': len(result)}
        if not self.has_gt:
            return record
        metrics = self.score(result) if utils.is_main_process() else None
        metrics = utils.all_gather_object(metrics)[0]
        record.update({'test_acc': metrics['overall'], 'test_acc_per_answer_type': metrics['perAnswerType'],
                       'baseline_most_frequent': metrics['baselines']['most_frequent']['overall'],
                       'baseline_question_prior': metrics['baselines']['question_prior']['overall']})
        write_json(os.path.join(self.output_dir, 'vqa_accuracy.json'), {**metrics, 'result_file': path})
        return record

    def score(self, result: Sequence[Mapping]) -> dict:
        """Accuracy of `result` and of the blind baselines, with the answer-list coverage of the test answers."""
        gt = self.ground_truth()
        scored = [r for r in result if r['question_id'] in gt.question_ids]
        if len(scored) < len(result):
            print(f'note: {len(result) - len(scored)} of {len(result)} test questions have no ground truth; '
                  f'accuracy is computed on the other {len(scored)}', flush=True)
        metrics = gt.score(scored)
        metrics['k_test'] = self.k
        metrics['candidates'] = len(self.answer_list)
        metrics['coverage'] = answer_coverage(self.test_items, self.answer_list)
        baselines = {}
        for bname, bres in blind_baselines(self.train_items, self.test_items, self.answer_list).items():
            b = gt.score([r for r in bres if r['question_id'] in gt.question_ids])
            baselines[bname] = {'overall': b['overall'], 'perAnswerType': b['perAnswerType']}
        metrics['baselines'] = baselines
        print(f'VQA accuracy {metrics["overall"]:.2f} on {metrics["questions"]} questions (per answer type: '
              + ', '.join(f'{k} {v:.2f}' for k, v in metrics['perAnswerType'].items())
              + f'); blind baselines: most frequent answer {baselines["most_frequent"]["overall"]:.2f}, '
              f'question prior {baselines["question_prior"]["overall"]:.2f}', flush=True)
        return metrics
