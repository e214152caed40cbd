"""VQA accuracy parity with the original vqaTools (fixture vqa_eval_accuracy.json), plus the VQA API's checks."""
import json
import os

import pytest

from vqaTools import VQA, VQAError, VQAEval, build_answer_list, vqa_accuracy
from vqaTools import vqa as vqa_module


def _reference(ref_dir):
    with open(os.path.join(ref_dir, 'vqa_eval_accuracy.json'), encoding='utf-8') as f:
        return json.load(f)


def _write_official(tmp_path, questions, header=True):
    """Annotation + question files in the official format (answer ids 1..10, confidence 'yes', as the fixture)."""
    meta = {'info': {'description': 'parity'}, 'task_type': 'Open-Ended', 'data_type': 'mscoco',
            'data_subtype': 'val2014', 'license': {'name': 'test'}} if header else {}
    anns = [{'question_id': q['question_id'], 'image_id': 100 + k // 3, 'question_type': q['question_type'],
             'answer_type': q['answer_type'], 'multiple_choice_answer': q['gt_answers'][0],
             'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j + 1}
                         for j, a in enumerate(q['gt_answers'])]} for k, q in enumerate(questions)]
    ques = [{'question_id': q['question_id'], 'image_id': 100 + k // 3, 'question': q['question']}
            for k, q in enumerate(questions)]
    ann_file, ques_file = tmp_path / 'annotations.json', tmp_path / 'questions.json'
    ann_file.write_text(json.dumps(dict(meta, annotations=anns)))
    ques_file.write_text(json.dumps(dict(meta, questions=ques)))
    return str(ann_file), str(ques_file)


def _evaluate(ref, tmp_path, n):
    ann_file, ques_file = _write_official(tmp_path, ref['questions'])
    res_file = tmp_path / 'results.json'
    res_file.write_text(json.dumps([{'question_id': q['question_id'], 'answer': q['pred_answer']}
                                    for q in ref['questions']]))
    vqa = VQA(ann_file, ques_file)
    evaluator = VQAEval(vqa, vqa.loadRes(str(res_file), ques_file), n=n)
    evaluator.evaluate()
    return vqa, evaluator


@pytest.mark.parametrize('n', [2, 8])
def test_parity_vqa_eval_accuracy(ref_dir, tmp_path, n):
    ref = _reference(ref_dir)
    _, ev = _evaluate(ref, tmp_path, n)
    for q in ref['questions']:
        qid = q['question_id']
        assert ev.predNormalised[qid] == q['pred_normalised'], (qid, q['why'])
        assert ev.gtAnswersCompared[qid] == q['gt_answers_as_compared'], (qid, q['why'])
        assert ev.evalQA[qid] == q[f'accuracy_n{n}'], (qid, q['why'])
        assert ev.evalQuesType[q['question_type']][qid] == q[f'accuracy_n{n}']
        assert ev.evalAnsType[q['answer_type']][qid] == q[f'accuracy_n{n}']
    assert ev.accuracy['overall'] == ref[f'overall_n{n}']
    assert ev.accuracy['perQuestionType'] == ref[f'perQuestionType_n{n}']
    assert ev.accuracy['perAnswerType'] == ref[f'perAnswerType_n{n}']
    assert list(ev.accuracy['perQuestionType']) == list(ref[f'perQuestionType_n{n}'])  # same order too


def test_parity_vqa_ground_truth_not_mutated_and_repeatable(ref_dir, tmp_path):
    ref = _reference(ref_dir)
    vqa, ev = _evaluate(ref, tmp_path, 2)
    for q in ref['questions']:  # we compare on copies (the original rewrote the GT in place)
        assert [a['answer'] for a in vqa.qa[q['question_id']]['answers']] == q['gt_answers']
    first = json.dumps([ev.accuracy, ev.evalQA])
    ev.evaluate()
    assert json.dumps([ev.accuracy, ev.evalQA]) == first


def test_parity_vqa_processing_functions():
    ev = VQAEval()
    assert ev.processPunctuation('.' * 40 + 'yes') == '........yes'  # count = 32
    assert ev.processPunctuation('3.5') == '3.5'
    assert ev.processPunctuation('a, b 1,000') == 'a b 1000'  # digit-comma-digit: every mark deleted
    assert ev.processPunctuation('x-y') == 'x y'
    assert ev.processDigitArticle('The Im Two oclock') == "im 2 o'clock"  # 'Im' key never matches
    assert ev.processDigitArticle('an  apple\tthree') == 'apple 3'


def test_parity_vqa_wrapper(ref_dir, tmp_path):
    ref = _reference(ref_dir)
    ann_file, ques_file = _write_official(tmp_path, ref['questions'])
    results = [{'question_id': q['question_id'], 'answer': q['pred_answer']} for q in ref['questions']]
    acc = vqa_accuracy(ann_file, ques_file, results, n=8)
    assert acc['overall'] == ref['overall_n8']


# ---------------------------------------------------------------------------------------------------------------
# VQA API
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path, ref_dir):
    questions = _reference(ref_dir)['questions'][:6]
    ann_file, ques_file = _write_official(tmp_path, questions)
    return VQA(ann_file, ques_file), questions, ques_file, tmp_path


def test_vqa_index_and_queries(small):
    vqa, questions, _, _ = small
    qids = [q['question_id'] for q in questions]
    assert vqa.getQuesIds() == qids
    assert vqa.getQuesIds(imgIds=100) == qids[:3]
    assert vqa.getQuesIds(imgIds=[101], ansTypes='yes/no') == [q['question_id'] for q in questions[3:6]
                                                               if q['answer_type'] == 'yes/no']
    assert vqa.getQuesIds(quesTypes=['how many']) == [q['question_id'] for q in questions
                                                      if q['question_type'] == 'how many']
    # the original's getImgIds(quesIds=...) crashed; ours returns the images of those questions
    assert vqa.getImgIds(quesIds=[qids[0], qids[4]]) == [100, 101]
    assert vqa.getImgIds(quesIds=qids[4], ansTypes=['no such type']) == []
    assert len(vqa.getImgIds()) == 6
    assert vqa.loadQA(qids[1])[0]['question_id'] == qids[1]
    assert [a['question_id'] for a in vqa.loadQA(qids[:2])] == qids[:2]
    assert sorted(vqa.imgToQA) == [100, 101]
    assert vqa.qqa[qids[0]]['question'] == questions[0]['question']
    with pytest.raises(KeyError):
        vqa.loadQA(123456)


def test_vqa_loadres_names_bad_ids(small):
    vqa, questions, ques_file, tmp_path = small
    qids = [q['question_id'] for q in questions]
    good = [{'question_id': q, 'answer': 'yes'} for q in qids]
    res = vqa.loadRes(good, ques_file)
    assert res.dataset['task_type'] == 'Open-Ended'
    assert res.qa[qids[0]]['question_type'] == questions[0]['question_type']
    assert 'image_id' not in good[0]  # the caller's records are not mutated

    bad = good[1:] + [{'question_id': 999, 'answer': 'x'}, dict(good[2])]
    with pytest.raises(VQAError) as e:
        vqa.loadRes(bad, ques_file)
    msg = str(e.value)
    assert '\n' not in msg
    assert f'missing question ids 1: {qids[0]}' in msg
    assert 'unknown question ids 1: 999' in msg
    assert f'duplicated question ids 1: {qids[2]}' in msg
    # duplicates may be allowed (distributed evaluation pads with repeats): the last one wins
    dup = good + [{'question_id': qids[2], 'answer': 'last'}]
    assert vqa.loadRes(dup, ques_file, allow_duplicates=True).qa[qids[2]]['answer'] == 'last'

    with pytest.raises(VQAError, match='item 0'):
        vqa.loadRes([{'answer': 'x'}], ques_file)
    with pytest.raises(VQAError, match='non-string answer'):
        vqa.loadRes([{'question_id': qids[0], 'answer': None}], ques_file)
    with pytest.raises(VQAError, match='JSON list'):
        vqa.loadRes({'question_id': 1}, ques_file)
    missing = tmp_path / 'nope.json'
    with pytest.raises(VQAError, match='nope.json'):
        vqa.loadRes(str(missing), ques_file)
    broken = tmp_path / 'broken.json'
    broken.write_text('[{')
    with pytest.raises(VQAError, match='broken.json'):
        vqa.loadRes(str(broken), ques_file)


def test_vqa_multiple_choice(tmp_path):
    meta = {'task_type': 'Multiple Choice'}
    ann = {'annotations': [{'question_id': 1, 'image_id': 5, 'question_type': 'what', 'answer_type': 'other',
                            'answers': [{'answer': 'red', 'answer_id': 1}]}]}
    ques = dict(meta, questions=[{'question_id': 1, 'image_id': 5, 'question': 'q?',
                                  'multiple_choices': ['red', 'blue']}])
    vqa = VQA(ann, ques)
    assert vqa.loadRes([{'question_id': 1, 'answer': 'blue'}], ques).qa[1]['answer'] == 'blue'
    with pytest.raises(VQAError, match='multiple choices'):
        vqa.loadRes([{'question_id': 1, 'answer': 'green'}], ques)


def test_vqa_bad_files(tmp_path):
    (tmp_path / 'a.json').write_text(json.dumps({'annotations': [{'question_id': 1}]}))
    (tmp_path / 'q.json').write_text(json.dumps({'questions': []}))
    (tmp_path / 'x.json').write_text(json.dumps({'something': []}))
    with pytest.raises(VQAError, match=r"a\.json: annotations\[0\] has no 'image_id'"):
        VQA(str(tmp_path / 'a.json'), str(tmp_path / 'q.json'))
    with pytest.raises(VQAError, match=r"x\.json has no top-level 'annotations'"):
        VQA(str(tmp_path / 'x.json'), str(tmp_path / 'q.json'))
    with pytest.raises(VQAError, match='missing.json'):
        VQA(str(tmp_path / 'missing.json'), str(tmp_path / 'q.json'))


def test_build_answer_list(tmp_path):
    albef = [{'question_id': 1, 'question': 'q', 'answer': ['red', 'red', 'blue'], 'image': 'x.jpg'},
             {'question_id': 2, 'question': 'q', 'answer': ['blue', 'green'], 'image': 'y.jpg'},
             {'question_id': 3, 'question': 'q', 'answer': 'green', 'image': 'y.jpg'}]
    official = {'annotations': [{'question_id': 9, 'image_id': 1,
                                 'answers': [{'answer': 'yes'}, {'answer': 'yes'}, {'answer': 'red'}]}]}
    (tmp_path / 'train.json').write_text(json.dumps(albef))
    (tmp_path / 'official.json').write_text(json.dumps(official))
    files = [str(tmp_path / 'train.json'), str(tmp_path / 'official.json')]
    assert build_answer_list(files, None) == ['red', 'blue', 'green', 'yes']  # ties alphabetical
    assert build_answer_list(files, 2) == ['red', 'blue']
    out = tmp_path / 'answer_list.json'
    assert vqa_module.main(['--train', *files, '--top-n', '3', '--out', str(out)]) == 0
    assert json.loads(out.read_text()) == ['red', 'blue', 'green']
    (tmp_path / 'bad.json').write_text(json.dumps([{'question_id': 1}]))
    with pytest.raises(VQAError, match=r'bad\.json: item 0'):
        build_answer_list([str(tmp_path / 'bad.json')], 5)


def test_vqa_toy_world_files(tmp_path):
    """The toy world's official-format VQA files go through VQA/loadRes/VQAEval."""
    from tests.toy import generate_world
    world = generate_world(str(tmp_path / 'world'), 0, train_images=8, val_images=4, test_images=4)
    ann_file = os.path.join(world, 'vqa_test_annotations.json')
    ques_file = os.path.join(world, 'vqa_test_questions.json')
    vqa = VQA(ann_file, ques_file)
    qids = vqa.getQuesIds()
    assert qids
    # predicting the most common human answer scores well; an absurd answer scores 0
    best = [{'question_id': q, 'answer': vqa.qa[q]['multiple_choice_answer']} for q in qids]
    ev = VQAEval(vqa, vqa.loadRes(best, ques_file), n=2)
    ev.evaluate()
    assert ev.accuracy['overall'] > 50
    wrong = [{'question_id': q, 'answer': 'zzz'} for q in qids]
    assert vqa_accuracy(ann_file, ques_file, wrong)['overall'] == 0
    assert build_answer_list([os.path.join(world, 'vqa_train.json'), os.path.join(world, 'vqa_test.json')]) \
        == json.load(open(os.path.join(world, 'answer_list.json')))
