"""VQA API and accuracy: `VQA` (official annotation/question files, `loadRes`), `VQAEval` (the accuracy
ALBEF's evaluation helper computes, quirks included), `VQAError`, `build_answer_list`, and `vqa_accuracy`, a
one-call wrapper.
"""
from vqaTools.vqa import VQA, VQAError, build_answer_list
from vqaTools.vqaEval import VQAEval

__all__ = ['VQA', 'VQAEval', 'VQAError', 'build_answer_list', 'vqa_accuracy']


def vqa_accuracy(annotation_file, question_file, result_file, n: int = 2) -> dict:
    """Accuracy dict {'overall', 'perQuestionType', 'perAnswerType'} (percent, n decimals) of a result file
    ([{'question_id', 'answer'}], a path or a list) against official annotation/question files."""
    vqa = VQA(annotation_file, question_file)
    evaluator = VQAEval(vqa, vqa.loadRes(result_file, question_file), n=n)
    evaluator.evaluate()
    return evaluator.accuracy
