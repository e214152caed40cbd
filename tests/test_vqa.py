"""VQA.py and evaluation/vqa.py.

Fast tests: collate and step shapes on a tiny model, the result file (each question once across padded shards,
server format), accuracy of a handmade case through vqaTools, blind baselines, answer-list coverage, k_test
clamping, batched == per-question answer ranking, the script end to end (train -> result files -> --evaluate
reproduces them) and one-line errors for bad input. Slow test: VQA fine-tuning on the toy world from the shared
`toy_pretrain` fixture answers far better than the blind baselines.
"""
import json
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import utils
import VQA
from dataset import DataError, create_dataset, vqa_collate_fn
from evaluation import vqa as vqa_eval
from tests.toy import TINY as TINY_BASE, TINY_SCHED, generate_world, make_toy_config
from vqaTools import VQAError

# The shared tiny model plus VQA's decoder depth and batch sizes.
TINY = dict(TINY_BASE, vqa_decoder_layers=1, batch_size_train=4, batch_size_test=5, k_test=4)


@pytest.fixture(scope='module')
def mini_world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('mini') / 'world'), 3, train_images=12, val_images=4,
                          test_images=5, image_size=48)


def mini_config(world, path, **overrides):
    return make_toy_config('VQA', world, str(path), **{**TINY, 'schedular': dict(TINY_SCHED), **overrides})


def run_args(cfg, out, *extra):
    return ['--config', cfg, '--output_dir', str(out), '--device', 'cpu', '--no-distributed', *extra]


def tiny_model_and_tokenizer(world, tmp_path):
    import models
    from engine import build_tokenizer
    config = utils.load_config(mini_config(world, tmp_path / 'vqa.yaml'))
    tok = build_tokenizer(config)
    torch.manual_seed(0)
    return models.create_model('vqa', config, tok), tok, config


# ----------------------------------------------------------------------------------------------------------------
# Collate and step
# ----------------------------------------------------------------------------------------------------------------
def test_collate_and_step_shapes(mini_world, tmp_path):
    model, tok, config = tiny_model_and_tokenizer(mini_world, tmp_path)
    train_set, test_set = create_dataset('vqa', config)
    images, questions, answers, weights, n = next(iter(DataLoader(train_set, batch_size=3,
                                                                  collate_fn=vqa_collate_fn)))
    assert images.shape == (3, 3, 16, 16) and len(questions) == 3 and len(n) == 3
    assert len(answers) == sum(n) == weights.numel() and weights.dtype == torch.float32
    assert all(a.endswith('[SEP]') for a in answers)
    start = 0
    for k in n:  # the weights of a 'vqa' question are answer shares: they sum to 1
        assert weights[start:start + k].sum().item() == pytest.approx(1.0)
        start += k
    # "[CLS] answer [SEP]": the eos string becomes the single [SEP] token at the end of each answer.
    enc = tok(answers, padding='longest', return_tensors='pt')
    last = enc.attention_mask.sum(1) - 1
    assert (enc.input_ids[:, 0] == tok.cls_token_id).all()
    assert (enc.input_ids.gather(1, last[:, None]).squeeze(1) == tok.sep_token_id).all()

    losses = VQA.make_step_fn(tok, torch.device('cpu'), 64)(model, (images, questions, answers, weights, n), 0.4)
    assert set(losses) == {'loss'} and losses['loss'].dim() == 0 and torch.isfinite(losses['loss'])
    losses['loss'].backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight.grad is not None

    # Test items: (image, question, question_id) batched by the default collate.
    images, questions, qids = next(iter(DataLoader(test_set, batch_size=2)))
    assert images.shape == (2, 3, 16, 16) and len(questions) == 2 and qids.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# Result files: every question once, across the padded shards of a DistributedSampler
# ----------------------------------------------------------------------------------------------------------------
class Questions(Dataset):
    """Item i = (image filled with i, 'question i', question_id 100 + i); the fake model answers list[i % Na]."""

    answer_list = ['yes', 'no', 'red', '2']

    def __init__(self, n):
        self.n = n
        self.ann = [{'question_id': 100 + i, 'question': f'question {i}'} for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1,), float(i)), f'question {i}', 100 + i


class FakeVQA(torch.nn.Module):
    """predict(): candidate (image value % Na) gets the top re-ranked probability, placed at a varying column so
    that the caller must take the argmax, not column 0."""

    def predict(self, images, q_ids, q_atts, cand_ids, cand_atts, k):
        na, b = cand_ids.size(0), images.size(0)
        best = images[:, 0].long() % na
        ids = torch.stack([(best + j) % na for j in range(k)], dim=1)
        probs = torch.full((b, k), 0.1 / max(k - 1, 1))
        col = torch.arange(b) % k
        ids[torch.arange(b), col], ids[:, 0] = ids[:, 0].clone(), ids[torch.arange(b), col].clone()
        probs[torch.arange(b), col] = 0.9
        return ids, probs


class StubTokenizer:
    def __call__(self, texts, **kwargs):
        ids = torch.ones(len(texts), 3, dtype=torch.long)
        return utils.AttrDict(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_result_merge_drops_sampler_padding(monkeypatch):
    """10 questions over 4 ranks: DistributedSampler pads to 12 (questions 0 and 1 twice): each answered once."""
    data, world = Questions(10), 4
    cand = torch.zeros(4, 3, dtype=torch.long)
    loaders = [DataLoader(data, batch_size=2, sampler=DistributedSampler(data, world, r, shuffle=False))
               for r in range(world)]
    shards = [vqa_eval.predict_answers(FakeVQA(), ld, StubTokenizer(), 'cpu', data.answer_list, cand, cand, 3,
                                       print_freq=100) for ld in loaders]
    assert sum(len(s['question_id']) for s in shards) == 12
    monkeypatch.setattr(utils, 'all_gather_object', lambda obj: shards)
    for ld in loaders:  # every rank merges the same gathered shards
        result = vqa_eval.collect_results(FakeVQA(), ld, StubTokenizer(), 'cpu', data.answer_list, cand, cand, 3,
                                          print_freq=100)
        assert result == [{'question_id': 100 + i, 'answer': data.answer_list[i % 4]} for i in range(10)]


def test_merge_results_keeps_dataset_order_and_first_answer():
    shards = [{'index': [0, 2, 0], 'question_id': [7, 9, 7], 'answer': ['a', 'c', 'a']},
              {'index': [1, 3], 'question_id': [8, 5], 'answer': ['b', 'd']}]
    assert vqa_eval.merge_results(shards) == [{'question_id': 7, 'answer': 'a'}, {'question_id': 8, 'answer': 'b'},
                                              {'question_id': 9, 'answer': 'c'}, {'question_id': 5, 'answer': 'd'}]


def test_collect_results_refuses_partial_loader():
    data = Questions(7)
    cand = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match='answers for 6 of 7 test questions'):
        vqa_eval.collect_results(FakeVQA(), DataLoader(data, batch_size=2, drop_last=True), StubTokenizer(), 'cpu',
                                 data.answer_list, cand, cand, 3, print_freq=100)


def test_save_result_server_format(tmp_path):
    result = [{'question_id': 3, 'answer': 'yes'}, {'question_id': 1, 'answer': 'two'}]
    path = vqa_eval.save_result(result, str(tmp_path), 'vqa_result_epoch7')
    assert path == str(tmp_path / 'vqa_result_epoch7.json')
    assert json.load(open(path)) == result


# ----------------------------------------------------------------------------------------------------------------
# Accuracy (vqaTools) on a handmade case
# ----------------------------------------------------------------------------------------------------------------
ITEMS = [  # test items as the toy world / a val split carries them
    {'question_id': 1, 'question': 'is it sunny?', 'image': 'a.jpg', 'answer': ['yes'] * 10},
    {'question_id': 2, 'question': 'how many dogs?', 'image': 'a.jpg', 'answer': ['2'] * 2 + ['3'] * 8},
    {'question_id': 3, 'question': 'what color is the car?', 'image': 'b.jpg', 'answer': ['red'] * 10},
]
PRED = [{'question_id': 1, 'answer': 'Yes'}, {'question_id': 2, 'answer': 'two'},
        {'question_id': 3, 'answer': 'blue'}]
# q1: 'Yes' -> 'yes', matches 9 others for every record -> 100. q2: 'two' -> '2'; a '2' record sees 1 other '2'
# (1/3), a '3' record sees 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6 -> 60. q3: 0. Overall 160 / 3 = 53.33.
EXPECTED = {'overall': 53.33, 'perAnswerType': {'yes/no': 100.0, 'number': 60.0, 'other': 0.0}}


def test_accuracy_handmade_case_from_items_and_official_files(tmp_path):
    gt = vqa_eval.GroundTruth.from_items(ITEMS)
    acc = gt.score(PRED)
    assert acc['overall'] == EXPECTED['overall'] and acc['perAnswerType'] == EXPECTED['perAnswerType']
    assert acc['questions'] == 3
    # The same through official-format files on disk (what --test_annotations / --test_questions read).
    anns, ques = vqa_eval.ground_truth_from_items(ITEMS)
    (tmp_path / 'a.json').write_text(json.dumps(anns))
    (tmp_path / 'q.json').write_text(json.dumps(ques))
    res = vqa_eval.save_result(PRED, str(tmp_path), 'res')
    acc2 = vqa_eval.GroundTruth(str(tmp_path / 'a.json'), str(tmp_path / 'q.json')).score(res)
    assert acc2['overall'] == EXPECTED['overall']


def test_ground_truth_single_string_answer_is_exact_match():
    gt = vqa_eval.GroundTruth.from_items([{'question_id': 4, 'question': 'q', 'answer': 'left'}])
    assert gt.score([{'question_id': 4, 'answer': 'left'}])['overall'] == 100.0
    assert gt.score([{'question_id': 4, 'answer': 'right'}])['overall'] == 0.0
    with pytest.raises(DataError, match='no test item carries an answer'):
        vqa_eval.ground_truth_from_items([{'question_id': 4, 'question': 'q'}])


def test_result_with_missing_or_duplicate_ids_is_named():
    gt = vqa_eval.GroundTruth.from_items(ITEMS)
    with pytest.raises(VQAError, match=r'missing question ids 1: 3'):
        gt.score(PRED[:2])
    with pytest.raises(VQAError, match=r'duplicated question ids 1: 2'):
        gt.score(PRED + [PRED[1]])


def test_blind_baselines():
    train = [{'question': 'is it sunny?', 'answer': ['no'] * 6 + ['yes'] * 4},
             {'question': 'how many dogs?', 'answer': ['3'] * 10},
             {'question': 'how many cats?', 'answer': ['3'] * 10},
             {'question': 'is it sunny', 'answer': ['no'] * 10},
             {'question': 'what color is the car?', 'answer': 'purple'}]  # not in the list: ignored
    base = vqa_eval.blind_baselines(train, ITEMS, ['yes', 'no', '2', '3', 'red'])
    assert [r['answer'] for r in base['most_frequent']] == ['3', '3', '3']
    # 'is it sunny?' and 'is it sunny' normalise alike (pre_question drops '?'); 'what color...' was never
    # answered with a listed answer, so it falls back to the most frequent answer.
    assert [r['answer'] for r in base['question_prior']] == ['no', '3', '3']
    gt = vqa_eval.GroundTruth.from_items(ITEMS)
    # '3' on q2 (8 of 10 humans said '3'): every record sees >= 3 matching others -> 100; q1, q3: 0.
    assert gt.score(base['most_frequent'])['overall'] == 33.33


def test_answer_coverage_counts_and_reports(capsys):
    cov = vqa_eval.answer_coverage(ITEMS + [{'question': 'q', 'answer': 'zebra'}], ['yes', 'red', '3'])
    assert cov == {'questions': 4, 'answers': 31, 'missing_answers': 3, 'missing_distinct': 2,
                   'unanswerable_questions': 1, 'most_common_missing': [['2', 2], ['zebra', 1]]}
    vqa_eval.report_coverage('train_file', cov)
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and "3 of 31 answers" in out and "'2' x2" in out and '1 of 4 questions' in out


def test_k_test_clamped_with_warning():
    with pytest.warns(vqa_eval.KTestWarning, match='k_test 128 is larger than the answer list \\(5 candidates\\)'):
        assert vqa_eval.clamp_k(128, 5) == 5
    assert vqa_eval.clamp_k(3, 5) == 3


# ----------------------------------------------------------------------------------------------------------------
# Ranking: batched over questions == one question at a time
# ----------------------------------------------------------------------------------------------------------------
def test_batched_ranking_equals_per_question(mini_world, tmp_path, monkeypatch):
    model, tok, config = tiny_model_and_tokenizer(mini_world, tmp_path)
    model.eval()
    answers = json.load(open(os.path.join(mini_world, 'answer_list.json')))
    cand_ids, cand_atts = vqa_eval.candidate_tensors(answers, '[SEP]', tok, 'cpu')
    assert (cand_ids[:, 0] == tok.cls_token_id).all() and cand_ids.size(0) == len(answers)
    questions = ['what color is the big circle?', 'how many squares are there?', 'is there a red square?',
                 'what shape is the small object?', 'is the blue circle to the left of the red square?']
    q = tok(questions, padding='longest', return_tensors='pt')
    torch.manual_seed(1)
    images = torch.randn(len(questions), 3, 16, 16)
    k = min(8, len(answers))
    with torch.no_grad():
        states = model.encode_question(images, q.input_ids, q.attention_mask)
        ids, probs = model.rank_answer(states, q.attention_mask, cand_ids, cand_atts, k)
        for i in range(len(questions)):
            # Each question alone, without the batch's padding columns.
            n_tok = int(q.attention_mask[i].sum())
            ids_i, probs_i = model.rank_answer(states[i:i + 1, :n_tok], q.attention_mask[i:i + 1, :n_tok],
                                               cand_ids, cand_atts, k)
            assert torch.equal(ids_i[0], ids[i])
            torch.testing.assert_close(probs_i[0], probs[i], atol=1e-5, rtol=1e-5)
    assert (probs[:, :-1] >= probs[:, 1:]).all()  # sorted, most probable first

    # Scoring the candidates in several decoder calls (2 questions per call, the last call shorter) changes nothing.
    import models.model_vqa as model_vqa
    monkeypatch.setattr(model_vqa, 'RANK_ROWS_PER_CALL', 2 * k + 1)
    with torch.no_grad():
        ids_chunked, probs_chunked = model.rank_answer(states, q.attention_mask, cand_ids, cand_atts, k)
    assert torch.equal(ids_chunked, ids)
    torch.testing.assert_close(probs_chunked, probs, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The script end to end on a mini world
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mini_pretrain_ckpt(mini_world, tmp_path_factory):
    """A pretraining-layout checkpoint of the tiny model (random weights: only the layout matters here)."""
    import models
    from engine import build_tokenizer
    folder = tmp_path_factory.mktemp('ckpt')
    config = utils.load_config(make_toy_config('Pretrain', mini_world, str(folder / 'p.yaml'),
                                               **{k: v for k, v in TINY.items() if k not in (
                                                   'vqa_decoder_layers', 'batch_size_train', 'batch_size_test',
                                                   'k_test')}))
    path = str(folder / 'pretrain.pth')
    torch.save({'model': models.create_model('pretrain', config, build_tokenizer(config)).state_dict()}, path)
    return path


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


def test_train_then_evaluate_end_to_end(mini_world, mini_pretrain_ckpt, tmp_path, capsys):
    cfg = mini_config(mini_world, tmp_path / 'vqa.yaml')
    out, eval_out = tmp_path / 'out', tmp_path / 'eval'
    record = VQA.main(run_args(cfg, out, '--checkpoint', mini_pretrain_ckpt, '--max_steps_per_epoch', '2'))
    assert '(pretrain -> vqa)' in capsys.readouterr().out
    assert (out / 'checkpoint_00.pth').is_file()
    test_items = json.load(open(os.path.join(mini_world, 'vqa_test.json')))
    answers = set(json.load(open(os.path.join(mini_world, 'answer_list.json'))))
    result = json.load(open(out / 'result' / 'vqa_result_epoch0.json'))
    assert json.load(open(out / 'result' / 'vqa_result.json')) == result
    assert [r['question_id'] for r in result] == [it['question_id'] for it in test_items]
    assert all(set(r) == {'question_id', 'answer'} and r['answer'] in answers for r in result)
    lines = log_lines(out)
    assert {'train_loss', 'train_lr', 'epoch'} <= set(lines[0])
    assert lines[-1]['epoch'] == 0 and lines[-1]['test_questions'] == len(test_items)
    acc = json.load(open(out / 'vqa_accuracy.json'))  # the toy test items carry answers: scored
    assert acc['overall'] == lines[-1]['test_acc'] == record['test_acc'] and acc['questions'] == len(test_items)
    assert set(acc['baselines']) == {'most_frequent', 'question_prior'} and acc['k_test'] == 4

    # --evaluate with the fine-tuned checkpoint answers exactly as the end of training did; the official files
    # of the toy world give the same accuracy plus question types.
    rec2 = VQA.main(run_args(cfg, eval_out, '--checkpoint', str(out / 'checkpoint_00.pth'), '--evaluate',
                             '--test_annotations', os.path.join(mini_world, 'vqa_test_annotations.json'),
                             '--test_questions', os.path.join(mini_world, 'vqa_test_questions.json')))
    assert json.load(open(eval_out / 'result' / 'vqa_result_epoch0.json')) == result
    assert rec2['test_acc'] == record['test_acc'] and rec2['checkpoint'] == str(out / 'checkpoint_00.pth')
    assert 'unknown' not in json.load(open(eval_out / 'vqa_accuracy.json'))['perQuestionType']
    assert not any(n.startswith('checkpoint') for n in os.listdir(eval_out))

    # A pretraining checkpoint is not a fine-tuned VQA model: --evaluate refuses it in one line.
    with pytest.raises(utils.UserError, match=r"pretrain.pth is a 'pretrain' checkpoint"):
        VQA.main(run_args(cfg, tmp_path / 'eval2', '--checkpoint', mini_pretrain_ckpt, '--evaluate'))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def _write_items(world, name, mutate, tmp_path):
    items = json.load(open(os.path.join(world, name)))
    mutate(items)
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


def test_training_question_without_answers(mini_world, tmp_path, capsys):
    bad = _write_items(mini_world, 'vqa_train.json', lambda items: items[1].update(answer=[]), tmp_path)
    cfg = mini_config(mini_world, tmp_path / 'c.yaml', train_file=[bad])
    assert utils.run_cli(VQA.main, run_args(cfg, tmp_path / 'o')) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{bad} item 1' in err and "'answer'" in err


def test_duplicate_test_question_id(mini_world, tmp_path):
    bad = _write_items(mini_world, 'vqa_test.json',
                       lambda items: items[2].update(question_id=items[0]['question_id']), tmp_path)
    cfg = mini_config(mini_world, tmp_path / 'c.yaml', test_file=[bad])
    with pytest.raises(DataError, match=rf'{bad} item 2: question_id \d+ repeats {bad} item 0'):
        VQA.main(run_args(cfg, tmp_path / 'o'))


def test_answers_outside_list_and_k_test_too_large(mini_world, mini_pretrain_ckpt, tmp_path, capsys):
    """Answers missing from the answer list are counted and reported (never fatal); k_test is clamped."""
    answers = json.load(open(os.path.join(mini_world, 'answer_list.json')))
    short = tmp_path / 'answer_list.json'
    short.write_text(json.dumps(answers[:3]))
    cfg = mini_config(mini_world, tmp_path / 'c.yaml', answer_list=str(short), k_test=50)
    with pytest.warns(vqa_eval.KTestWarning, match='k_test 50 is larger than the answer list \\(3 candidates\\)'):
        record = VQA.main(run_args(cfg, tmp_path / 'o', '--checkpoint', mini_pretrain_ckpt,
                                   '--max_steps_per_epoch', '1', '--eval_every_epoch'))
    out = capsys.readouterr().out
    assert 'note: train_file:' in out and 'are not in answer_list' in out
    result = json.load(open(tmp_path / 'o' / 'result' / 'vqa_result.json'))
    assert {r['answer'] for r in result} <= set(answers[:3]) and 'test_acc' in record
    assert json.load(open(tmp_path / 'o' / 'vqa_accuracy.json'))['coverage']['missing_answers'] > 0
    # --eval_every_epoch: the epoch's log line carries the test accuracy; the last epoch is not answered twice.
    lines = log_lines(tmp_path / 'o')
    assert len(lines) == 1 and lines[0]['epoch'] == 0 and lines[0]['test_acc'] == record['test_acc']
    assert 'train_loss' in lines[0]


def test_answer_list_cli(mini_world, tmp_path):
    from vqaTools import answer_list
    out = tmp_path / 'list.json'
    assert answer_list.main(['--train', os.path.join(mini_world, 'vqa_train.json'), '--top-n', '5',
                             '--out', str(out)]) == 0
    from collections import Counter
    counts = Counter(a for it in json.load(open(os.path.join(mini_world, 'vqa_train.json'))) for a in it['answer'])
    assert json.load(open(out)) == sorted(counts, key=lambda a: (-counts[a], a))[:5]


# ----------------------------------------------------------------------------------------------------------------
# Learning on the toy world (slow)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_vqa_learns(toy_world, toy_pretrain, tmp_path):
    """Fine-tune from the shared toy pretraining; accuracy must clearly beat answering without the image."""
    cfg = make_toy_config('VQA', toy_world, str(tmp_path / 'VQA.yaml'))
    out = tmp_path / 'out'
    start = time.time()
    record = VQA.main(run_args(cfg, out, '--checkpoint', os.path.join(toy_pretrain, 'checkpoint_last.pth'),
                               '--test_annotations', os.path.join(toy_world, 'vqa_test_annotations.json'),
                               '--test_questions', os.path.join(toy_world, 'vqa_test_questions.json')))
    acc = json.load(open(out / 'vqa_accuracy.json'))
    chance = acc['baselines']['most_frequent']['overall']
    prior = acc['baselines']['question_prior']['overall']
    print(f'toy VQA: accuracy {acc["overall"]:.2f} (per answer type {acc["perAnswerType"]}), most frequent '
          f'answer {chance:.2f}, question prior {prior:.2f}, {time.time() - start:.0f} s')
    assert record['test_acc'] == acc['overall']
    assert acc['overall'] >= chance + 40 and acc['overall'] >= prior + 20
    # The inference API answers as VQA.py did with the same weights (the last epoch's, which it evaluated).
    from models import load_model
    config = utils.load_config(cfg)
    api = load_model(str(out / 'checkpoint_last.pth'), device='cpu')
    answered = {r['question_id']: r['answer'] for r in json.load(open(out / 'result' / 'vqa_result.json'))}
    items = json.load(open(config['test_file'][0]))[:20]
    same = sum(api.answer(os.path.join(config['vqa_root'], it['image']), it['question'], config['answer_list'],
                          k=config['k_test']) == answered[it['question_id']] for it in items)
    assert same >= 19, f'the API agrees with VQA.py on {same} of {len(items)} questions'
