"""The VQA API (official annotation/question JSON format) as used by ALBEF's evaluation helpers.

`VQA(annotation_file, question_file)` indexes the ground truth; `loadRes(result_file, question_file)` returns a VQA
object holding predictions for VQAEval. Differences from the original API, all deliberate:

* `getImgIds(quesIds=...)` works (the original summed annotation dicts and crashed);
* `loadRes` checks the result file and raises `VQAError` naming the missing, duplicated or unknown question ids
  (or the bad item) instead of a bare assertion; duplicated ids are accepted only with
  `allow_duplicates=True` (the last one wins, as in the original; DistributedSampler padding produces them);
* files that are missing, not JSON or without the expected top-level key raise `VQAError` naming the file;
* `info()` prints the annotation file's info (the original misspelt the attribute and crashed);
* metadata keys absent from the question file (info, license, ...) are simply not copied.

Also here: `build_answer_list(train_files, top_n)`, the most frequent answers of VQA training files, and a small
CLI: `python -m vqaTools.vqa --train FILE [FILE ...] --top-n N --out answer_list.json`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from collections import Counter
from typing import Any, Iterable, Sequence

from utils import UserError

__all__ = ['VQA', 'VQAError', 'build_answer_list']


class VQAError(UserError, ValueError):
    """Bad VQA annotation, question or result data; the one-line message names the file and the culprit."""


def _as_list(x: Any) -> list:
    """The original API's convention: a list (or tuple/set) is used as is, anything else becomes [x]."""
    if isinstance(x, (list, tuple, set, frozenset)):
        return list(x)
    return [x]


def _name_ids(ids: Iterable, limit: int = 10) -> str:
    ids = sorted(ids, key=lambda v: (str(type(v)), v))
    shown = ', '.join(repr(i) for i in ids[:limit])
    more = f' (+{len(ids) - limit} more)' if len(ids) > limit else ''
    return f'{len(ids)}: {shown}{more}'


def _load_json(path_or_obj: Any, what: str) -> tuple[Any, str]:
    """(object, name for messages) from a path or an already-loaded object."""
    if not isinstance(path_or_obj, (str, os.PathLike)):
        return path_or_obj, f'<{what} object>'
    path = os.fspath(path_or_obj)
    if not os.path.isfile(path):  # also refuses FIFOs and devices, which would block or stream forever
        raise VQAError(f'{what} file not found (or not a regular file): {path}')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise VQAError(f'{what} file {path} is not valid JSON: {e}') from None
    except UnicodeDecodeError as e:
        raise VQAError(f'{what} file {path} is not UTF-8 text (offset {e.start})') from None
    except RecursionError:
        raise VQAError(f'{what} file {path}: JSON nested too deeply to parse') from None


def _require_key(obj: Any, key: str, name: str, what: str) -> None:
    if not isinstance(obj, dict) or key not in obj:
        raise VQAError(f"{what} {name} has no top-level '{key}' list")


class VQA:
    """Index of VQA annotations and questions (official format).

    Attributes: `dataset` (annotation JSON), `questions` (question JSON), `qa` {question_id: annotation},
    `qqa` {question_id: question record}, `imgToQA` {image_id: [annotations]}.
    """

    def __init__(self, annotation_file: Any = None, question_file: Any = None):
        """Load and index both files when both are given (paths, or already-loaded dicts); else an empty object."""
        self.dataset: dict = {}
        self.questions: dict = {}
        self.qa: dict = {}
        self.qqa: dict = {}
        self.imgToQA: dict = {}
        if annotation_file is not None and question_file is not None:
            dataset, dname = _load_json(annotation_file, 'annotation')
            questions, qname = _load_json(question_file, 'question')
            _require_key(dataset, 'annotations', dname, 'annotation file')
            _require_key(questions, 'questions', qname, 'question file')
            for k, ann in enumerate(dataset['annotations']):
                for key in ('question_id', 'image_id', 'answers'):
                    if not isinstance(ann, dict) or key not in ann:
                        raise VQAError(f"annotation file {dname}: annotations[{k}] has no '{key}'")
            for k, q in enumerate(questions['questions']):
                if not isinstance(q, dict) or 'question_id' not in q:
                    raise VQAError(f"question file {qname}: questions[{k}] has no 'question_id'")
            self.dataset = dataset
            self.questions = questions
            self.createIndex()

    def createIndex(self) -> None:
        """Build imgToQA, qa and qqa from `dataset` and `questions`."""
        imgToQA: dict = {ann['image_id']: [] for ann in self.dataset['annotations']}
        qa: dict = {}
        qqa: dict = {}
        for ann in self.dataset['annotations']:
            imgToQA[ann['image_id']].append(ann)
            qa[ann['question_id']] = ann
        for ques in self.questions.get('questions', []):
            qqa[ques['question_id']] = ques
        self.imgToQA, self.qa, self.qqa = imgToQA, qa, qqa

    def info(self) -> None:
        """Print the annotation file's 'info' block."""
        for key, value in self.dataset.get('info', {}).items():
            print(f'{key}: {value}')

    def _filter(self, anns: list, quesTypes: list, ansTypes: list) -> list:
        if quesTypes:
            anns = [ann for ann in anns if ann.get('question_type') in quesTypes]
        if ansTypes:
            anns = [ann for ann in anns if ann.get('answer_type') in ansTypes]
        return anns

    def getQuesIds(self, imgIds=[], quesTypes=[], ansTypes=[]) -> list:
        """Question ids (annotation order) of the given images, question types and answer types (empty: all)."""
        imgIds, quesTypes, ansTypes = _as_list(imgIds), _as_list(quesTypes), _as_list(ansTypes)
        if imgIds:
            anns = [ann for img in imgIds if img in self.imgToQA for ann in self.imgToQA[img]]
        else:
            anns = self.dataset.get('annotations', [])
        return [ann['question_id'] for ann in self._filter(anns, quesTypes, ansTypes)]

    def getImgIds(self, quesIds=[], quesTypes=[], ansTypes=[]) -> list:
        """Image ids (one per matching annotation, so possibly repeated, as the original) of the given questions,
        question types and answer types (empty: all)."""
        quesIds, quesTypes, ansTypes = _as_list(quesIds), _as_list(quesTypes), _as_list(ansTypes)
        if quesIds:
            anns = [self.qa[q] for q in quesIds if q in self.qa]
        else:
            anns = self.dataset.get('annotations', [])
        return [ann['image_id'] for ann in self._filter(anns, quesTypes, ansTypes)]

    def loadQA(self, ids=[]) -> list:
        """Annotations of the given question id(s)."""
        out = []
        for i in _as_list(ids):
            if i not in self.qa:
                raise KeyError(f'unknown question_id {i!r}')
            out.append(self.qa[i])
        return out

    def showQA(self, anns: Sequence[dict]) -> int | None:
        """Print each annotation's question and answers."""
        if len(anns) == 0:
            return 0
        for ann in anns:
            qid = ann['question_id']
            print(f"Question: {self.qqa[qid]['question'] if qid in self.qqa else '<unknown>'}")
            for ans in ann['answers']:
                print(f"Answer {ans.get('answer_id', '?')}: {ans['answer']}")
        return None

    def loadRes(self, resFile: Any, quesFile: Any, allow_duplicates: bool = False) -> 'VQA':
        """A VQA object holding the results of `resFile` ([{'question_id', 'answer'}], a path or a list).

        The result question ids must cover exactly this object's questions: missing, unknown and (unless
        `allow_duplicates`) duplicated ids raise VQAError listing them. Each result gets the ground truth's
        image_id, question_type and answer_type. With task_type 'Multiple Choice' each answer must be one of the
        question's choices.
        """
        res = VQA()
        res.questions, qname = _load_json(quesFile, 'question')
        _require_key(res.questions, 'questions', qname, 'question file')
        for key in ('info', 'task_type', 'data_type', 'data_subtype', 'license'):
            if key in self.questions:
                res.dataset[key] = copy.deepcopy(self.questions[key])
        anns, rname = _load_json(resFile, 'result')
        if not isinstance(anns, list):
            raise VQAError(f'result file {rname} must hold a JSON list of {{"question_id", "answer"}} records, '
                           f'got {type(anns).__name__}')
        anns = [dict(a) if isinstance(a, dict) else a for a in anns]  # never mutate the caller's objects
        for k, ann in enumerate(anns):
            if not isinstance(ann, dict) or 'question_id' not in ann or 'answer' not in ann:
                raise VQAError(f"result file {rname}: item {k} is not a {{'question_id', 'answer'}} record: "
                               f'{str(ann)[:80]}')
            if not isinstance(ann['answer'], str):
                raise VQAError(f"result file {rname}: item {k} (question_id {ann['question_id']!r}) has a "
                               f"non-string answer {ann['answer']!r}")
        counts = Counter(ann['question_id'] for ann in anns)
        expected = set(self.getQuesIds())
        problems = []
        missing = expected - set(counts)
        unknown = set(counts) - expected
        duplicated = {q for q, c in counts.items() if c > 1}
        if missing:
            problems.append(f'missing question ids {_name_ids(missing)}')
        if unknown:
            problems.append(f'unknown question ids {_name_ids(unknown)}')
        if duplicated and not allow_duplicates:
            problems.append(f'duplicated question ids {_name_ids(duplicated)}')
        if problems:
            raise VQAError(f'result file {rname} does not match the annotations ({len(expected)} questions): '
                           + '; '.join(problems))
        multiple_choice = res.dataset.get('task_type') == 'Multiple Choice'
        for ann in anns:
            qid = ann['question_id']
            if multiple_choice and ann['answer'] not in self.qqa.get(qid, {}).get('multiple_choices', []):
                raise VQAError(f'result file {rname}: question_id {qid!r}: answer {ann["answer"]!r} is not one '
                               f'of the multiple choices')
            gt = self.qa[qid]
            ann['image_id'] = gt['image_id']
            ann['question_type'] = gt.get('question_type')
            ann['answer_type'] = gt.get('answer_type')
        res.dataset['annotations'] = anns
        res.createIndex()
        return res


# ----------------------------------------------------------------------------------------------------------------
# Answer list
# ----------------------------------------------------------------------------------------------------------------
def _answers_of_file(path: str) -> Iterable[str]:
    data, name = _load_json(path, 'VQA training')
    if isinstance(data, dict) and 'annotations' in data:  # official annotation file
        for k, ann in enumerate(data['annotations']):
            answers = ann.get('answers') if isinstance(ann, dict) else None
            if not isinstance(answers, list):
                raise VQAError(f"VQA training file {name}: annotations[{k}] has no 'answers' list")
            for a in answers:
                if not isinstance(a, dict) or not isinstance(a.get('answer'), str):
                    raise VQAError(f"VQA training file {name}: annotations[{k}] has an answer without 'answer'")
                yield a['answer']
    elif isinstance(data, list):  # ALBEF's vqa_train.json / vg_qa.json: 'answer' is a list of strings
        for k, item in enumerate(data):
            answers = item.get('answer') if isinstance(item, dict) else None
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise VQAError(f"VQA training file {name}: item {k} has no 'answer' list of strings")
            yield from answers
    else:
        raise VQAError(f"VQA training file {name}: expected an ALBEF list of items or an official annotation "
                       f"file with 'annotations'")


def build_answer_list(train_files: Sequence[str] | str, top_n: int | None = None) -> list[str]:
    """The `top_n` most frequent answer strings (all if None) over VQA training files, most frequent first.

    Accepts ALBEF-format files (items whose 'answer' is a list of human answers, e.g. vqa_train.json,
    vg_qa.json) and official VQA annotation files ('annotations' with 'answers'). Every human answer counts
    once (an answer given by 3 annotators of a question counts 3 times); ties are broken alphabetically.
    Answers are counted as written (no normalisation).

    Note: the answer_list.json released with ALBEF (3,128 answers) cannot be rebuilt exactly from the VQA v2
    counts: it was inherited from earlier work, whose selection (answer normalisation, frequency threshold,
    splits used) is not published, so this function gives a list of the same kind, not the same list.
    """
    if isinstance(train_files, (str, os.PathLike)):
        train_files = [train_files]
    if top_n is not None and top_n <= 0:
        raise VQAError(f'build_answer_list: top_n must be positive, got {top_n}')
    counts: Counter = Counter()
    for path in train_files:
        counts.update(_answers_of_file(os.fspath(path)))
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return ranked if top_n is None else ranked[:top_n]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the most frequent answers of VQA training files as a JSON list."""
    parser = argparse.ArgumentParser(description='Build a VQA answer list (most frequent answers first).')
    parser.add_argument('--train', nargs='+', required=True, help='ALBEF vqa_train.json-style or official files')
    parser.add_argument('--top-n', type=int, default=None, help='keep this many answers (default: all)')
    parser.add_argument('--out', required=True, help='output JSON file')
    args = parser.parse_args(argv)
    try:
        answers = build_answer_list(args.train, args.top_n)
    except VQAError as e:
        print(f'error: {e}')
        return 2
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(answers, f)
    print(f'wrote {len(answers)} answers to {args.out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
