"""Retrieval.py and evaluation/retrieval.py: datasets, training forward, re-ranking == the original's per-query
loop (tests/retrieval_reference.py; also split over two simulated ranks), R@K on hand-made score matrices, CLI
outputs and errors, toy learning."""
import json
import warnings

import numpy as np
import pytest
import torch

import models
import utils
from evaluation import retrieval as R
from evaluation.retrieval_metrics import _gt_ranks
from tests import retrieval_reference as ref_impl

TINY_BERT = dict(vocab_size=200, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, fusion_layer=2, hidden_act='gelu', layer_norm_eps=1e-12,
                 type_vocab_size=2, pad_token_id=0, initializer_range=0.02, hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1)
TINY_MODEL = dict(image_res=32, patch_size=8, vision_width=32, vision_depth=2, vision_num_heads=2, embed_dim=16,
                  bert_config=TINY_BERT, queue_size=64, temp=0.07, momentum=0.99, alpha=0.4, distill=True,
                  load_text_weights=False, vision_pretrained=None)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tests run many tiny ops, whose thread synchronisation dominates on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A tiny toy world (24 train / 8 val / 8 test images, 5 captions each)."""
    from tests.toy import generate_world
    return generate_world(str(tmp_path_factory.mktemp('re_world') / 'w'), 5, train_images=24, val_images=8,
                          test_images=8)


def tiny_config(world, **over):
    cfg = dict(TINY_MODEL, train_file=[f'{world}/retrieval_train.json'], val_file=f'{world}/retrieval_val.json',
               test_file=f'{world}/retrieval_test.json', image_root=f'{world}/images', text_encoder=f'{world}/vocab',
               batch_size_train=8, batch_size_test=4, k_test=4, num_workers=0, print_freq=5,
               optimizer={'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02},
               schedular={'sched': 'cosine', 'lr': 1e-4, 'epochs': 1, 'min_lr': 1e-5, 'decay_rate': 1,
                          'warmup_lr': 1e-4, 'warmup_epochs': 1, 'cooldown_epochs': 0})
    cfg.update(over)
    return cfg


def write_config(cfg, path):
    utils.save_config(cfg, str(path))
    return str(path)


@pytest.fixture(scope='module')
def tokenizer(world):
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(f'{world}/vocab')


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return models.create_model('retrieval', TINY_MODEL).eval()


def random_features(model, n_img=10, n_txt=37, seed=1):
    """Features with random image states and real text-layer states of random right-padded texts."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n_txt,), generator=g)
    atts = (torch.arange(30)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 200, (n_txt, 30), generator=g) * atts
    ids[:, 0] = 2
    with torch.no_grad():
        text_embeds, text_feat = model.encode_text(ids, atts)
    image_feat = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    return R.RetrievalFeatures(image_feat=image_feat, text_feat=text_feat, text_atts=atts, text_embeds=text_embeds,
                               image_embeds=torch.randn(n_img, 17, 32, generator=g))


def assert_same_scores(a, b, atol=1e-4):
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        assert torch.equal(x == R.NO_SCORE, y == R.NO_SCORE), 'different top-k candidates'
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Data and training forward
# ------------------------------------------------------------------------------------------------------------
def test_create_dataset_re_formats(world):
    from dataset import create_dataset
    train, val, test = create_dataset('re', tiny_config(world))
    image, caption, idx = train[7]
    assert image.shape == (3, 32, 32) and isinstance(caption, str) and isinstance(idx, int)
    assert idx == train.img_ids[train.ann[7]['image_id']]
    for ds in (val, test):
        assert len(ds) == 8 and len(ds.text) == 40
        assert all(ds.txt2img[t] == i for i, ts in ds.img2txt.items() for t in ts)
        image, index = ds[3]
        assert image.shape == (3, 32, 32) and index == 3


def _write_train(tmp_path, items):
    path = tmp_path / 'train.json'
    path.write_text(json.dumps(items))
    return path


def test_image_ids_must_match_images(world, tmp_path):
    from dataset import DataError, re_train_dataset
    from Retrieval import check_image_ids
    img = lambda n: f'toy_{n:06d}.jpg'  # noqa: E731
    ok = [{'image': img(0), 'caption': 'a', 'image_id': 0}, {'image': img(0), 'caption': 'b', 'image_id': 0}]
    check_image_ids(re_train_dataset([str(_write_train(tmp_path, ok))], None, f'{world}/images'))
    same_id = ok + [{'image': img(1), 'caption': 'c', 'image_id': 0}]
    with pytest.raises(DataError, match=r"train.json item 2: image_id 0 is given to image 'toy_000001.jpg'"):
        check_image_ids(re_train_dataset([str(_write_train(tmp_path, same_id))], None, f'{world}/images'))
    two_ids = ok + [{'image': img(0), 'caption': 'c', 'image_id': '0'}]
    with pytest.raises(DataError, match=r"item 2: image 'toy_000000.jpg' has image_id '0', but .*item 0"):
        check_image_ids(re_train_dataset([str(_write_train(tmp_path, two_ids))], None, f'{world}/images'))


def test_empty_caption_list_is_a_clear_error(world, tmp_path):
    from dataset import DataError, re_eval_dataset
    path = tmp_path / 'val.json'
    path.write_text(json.dumps([{'image': 'toy_000000.jpg', 'caption': ['x']},
                                {'image': 'toy_000001.jpg', 'caption': []}]))
    with pytest.raises(DataError, match='val.json item 1: .*empty caption list'):
        re_eval_dataset(str(path), None, f'{world}/images')


def test_training_step_forward_and_tokenization(world, tokenizer):
    from dataset import create_dataset
    from Retrieval import make_step_fn
    train, _, _ = create_dataset('re', tiny_config(world))
    model = tiny_model().train()
    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    losses = make_step_fn(tokenizer, torch.device('cpu'))(model, batch, 0.4)
    assert set(losses) == {'loss_ita', 'loss_itm'} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.itm_head.weight.grad is not None and model.temp.grad is not None
    # As the original's Retrieval.py: padding longest + max_length 30 without truncation=True does not truncate.
    long_caption = ' '.join(['red'] * 40)
    seen = {}

    class Spy:
        def __call__(self, texts, **kw):
            seen.update(kw)
            out = tokenizer(texts, **kw)
            seen['width'] = out.input_ids.shape[1]
            return out
    step = make_step_fn(Spy(), torch.device('cpu'))
    step(model, (batch[0][:2], [long_caption, 'a red circle'], torch.tensor([0, 1])), 0.0)
    assert seen['padding'] == 'longest' and seen['max_length'] == 30 and 'truncation' not in seen
    assert seen['width'] == 41


# ------------------------------------------------------------------------------------------------------------
# Evaluation: fast == reference, rank split, metrics
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('score', ['itm', 'itm+itc'])
@pytest.mark.parametrize('fusion_layer', [2, 3])
def test_fast_equals_reference(score, fusion_layer):
    cfg = dict(TINY_MODEL, bert_config=dict(TINY_BERT, fusion_layer=fusion_layer))
    torch.manual_seed(0)
    model = models.create_model('retrieval', cfg).eval()
    feats = random_features(model)
    ref = ref_impl.rerank_reference(model, feats, 5, score=score, progress=False)
    for batch in (7, 10_000):
        fast = R.rerank_fast(model, feats, 5, score=score, itm_batch_size=batch, progress=False)
        assert_same_scores(fast, ref)
    # Every re-ranked entry is the model's own ITM logit of that pair (plus the similarity for itm+itc).
    i, t = 3, int(ref[0][3].argmax())
    with torch.no_grad():
        logit = model.itm_logits(feats.text_embeds[t:t + 1], feats.text_atts[t:t + 1],
                                 feats.image_embeds[i:i + 1])[0, 1]
    expected = logit + (feats.similarity()[i, t] if score == 'itm+itc' else 0)
    torch.testing.assert_close(ref[0][i, t], expected, atol=1e-5, rtol=0)


def test_two_rank_split_simulated():
    model = tiny_model()
    feats = random_features(model, n_img=9, n_txt=31)
    single = R.rerank_fast(model, feats, 6, progress=False)
    parts = [R.rerank_fast(model, feats, 6, rank=r, world=2, reduce=False, progress=False) for r in range(2)]
    # Each rank scored a disjoint slice of the unique pairs; the other pairs read 0 there, so the sum is exact.
    pairs = R.candidate_pairs(*R.top_candidates(feats.similarity(), 6), 31)
    slices = [R.rank_slice(pairs.numel(), r, 2) for r in range(2)]
    assert slices[0][0] == 0 and slices[0][1] == slices[1][0] and slices[1][1] == pairs.numel()
    assert 0 < slices[0][1] < pairs.numel()
    merged = [parts[0][k] + parts[1][k] - torch.where(single[k] == R.NO_SCORE, R.NO_SCORE, 0.0) for k in range(2)]
    assert_same_scores(merged, single)
    # The reference splits rows as the original (blocks of n // W + 1); merging the owned rows gives the same.
    ref_parts = [ref_impl.rerank_reference(model, feats, 6, rank=r, world=2, reduce=False, progress=False) for r in range(2)]
    merged = []
    for k, n in ((0, 9), (1, 31)):
        m = torch.full_like(single[k], R.NO_SCORE)
        for r in range(2):
            a, b = ref_impl.reference_rows(n, r, 2)
            m[a:b] = ref_parts[r][k][a:b]
        merged.append(m)
    assert_same_scores(merged, single)
    assert ref_impl.reference_rows(9, 0, 2) == (0, 5) and ref_impl.reference_rows(9, 1, 2) == (5, 9)


def test_k_test_larger_than_candidates_is_clamped_with_a_warning():
    model = tiny_model()
    feats = random_features(model, n_img=4, n_txt=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fast = R.rerank_fast(model, feats, 50, progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert messages == ['k_test 50 is larger than the number of candidate images (4); using k = 4',
                        'k_test 50 is larger than the number of candidate texts (9); using k = 9']
    assert not (fast[0] == R.NO_SCORE).any() and not (fast[1] == R.NO_SCORE).any()  # everything re-ranked
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = ref_impl.rerank_reference(model, feats, 50, progress=False)
    assert_same_scores(fast, ref)


def test_itc_mode_is_the_similarity():
    model = tiny_model()
    feats = random_features(model)
    i2t, t2i = R.rerank_fast(model, feats, 5, score='itc', progress=False)
    torch.testing.assert_close(i2t, feats.similarity())
    torch.testing.assert_close(t2i, feats.similarity().t())
    with pytest.raises(utils.ConfigError, match='score must be one of'):
        R.rerank_fast(model, feats, 5, score='itx')


def test_itm_eval_on_hand_made_scores():
    img2txt = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    txt2img = {t: i for i, ts in img2txt.items() for t in ts}
    i2t = np.array([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],    # gt 1 first -> rank 0
                    [0.5, 0.0, 0.1, 0.2, 0.9, 0.8],    # best gt (3) at position 3
                    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]],   # best gt (4) at position 4
                   dtype=np.float32)
    t2i = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.9, 0.1], [0.9, 0.0, 0.1],
                    [0.0, 0.1, 0.9], [0.1, 0.0, 0.9]], dtype=np.float32)  # gt ranks 0, 1, 0, 1, 0, 0
    m = R.itm_eval(i2t, t2i, txt2img, img2txt)
    assert m['txt_r1'] == pytest.approx(100 / 3) and m['txt_r5'] == 100 and m['txt_r10'] == 100
    assert m['img_r1'] == pytest.approx(400 / 6) and m['img_r5'] == 100
    assert m['txt_r_mean'] == pytest.approx((100 / 3 + 200) / 3)
    assert m['img_r_mean'] == pytest.approx((400 / 6 + 200) / 3)
    assert m['r_mean'] == pytest.approx((m['txt_r_mean'] + m['img_r_mean']) / 2)
    # Ties (the -100 fill) are broken like the original's reversed np.argsort.
    tied = np.full((3, 6), -100.0, dtype=np.float32)
    ranks = _gt_ranks(tied, [img2txt[i] for i in range(3)])
    expected = [min(list(np.argsort(row)[::-1]).index(t) for t in img2txt[i]) for i, row in enumerate(tied)]
    assert ranks.tolist() == expected


def test_evaluate_end_to_end_fast_equals_reference(world, tokenizer):
    from dataset import create_dataset, create_loader
    _, val, _ = create_dataset('re', tiny_config(world))
    loader = create_loader([val], [None], [3], [0], [False], [None])[0]
    model = tiny_model()
    dev = torch.device('cpu')
    fast = R.score_matrices(model, loader, tokenizer, dev, k_test=4, itm_batch_size=16, progress=False)
    ref = ref_impl.evaluate_reference(model, loader, tokenizer, dev, k_test=4, progress=False)
    assert fast[0].shape == (8, 40) and fast[1].shape == (40, 8)
    assert_same_scores(fast, ref)
    assert R.itm_eval(*fast, val.txt2img, val.img2txt) == R.itm_eval(*ref, val.txt2img, val.img2txt)
    bf16 = R.score_matrices(model, loader, tokenizer, dev, k_test=4, precision='bf16', progress=False)
    both = (bf16[0] != R.NO_SCORE) & (ref[0] != R.NO_SCORE)  # bf16 similarities may pick other candidates
    assert both.any() and np.abs(bf16[0] - ref[0])[both].max() < 0.1


# ------------------------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------------------------
def _save_model(model, path):
    torch.save({'model': model.state_dict(), 'config': {}, 'epoch': 0}, path)
    return str(path)


def test_train_then_evaluate_cli(world, tmp_path):
    import Retrieval
    cfg = write_config(tiny_config(world), tmp_path / 'cfg.yaml')
    out = tmp_path / 'train'
    Retrieval.main(['--config', cfg, '--output_dir', str(out), '--device', 'cpu', '--no-distributed',
                    '--max_steps_per_epoch', '2'])
    lines = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    assert {'train_loss_ita', 'train_loss_itm', 'train_lr', 'val_txt_r1', 'val_img_r10', 'val_r_mean',
            'test_txt_r_mean', 'test_r_mean', 'epoch'} <= set(lines[0])
    assert (out / 'checkpoint_best.pth').is_file()
    results = json.loads((out / 'retrieval_test_metrics.json').read_text())
    assert results['best_epoch'] == 0 and results['test']['r_mean'] == lines[0]['test_r_mean']
    assert results['val']['txt_r1'] == lines[0]['val_txt_r1']

    ev = tmp_path / 'eval'
    record = Retrieval.main(['--config', cfg, '--output_dir', str(ev), '--device', 'cpu', '--no-distributed',
                             '--checkpoint', str(out / 'checkpoint_best.pth'), '--evaluate', '--score', 'itm+itc',
                             '--k_test', '50'])
    assert record['test_r_mean'] > 0
    assert not (ev / 'checkpoint_best.pth').exists()
    saved = json.loads((ev / 'retrieval_test_metrics.json').read_text())
    assert saved['settings']['score'] == 'itm+itc' and saved['test']['r_mean'] == record['test_r_mean']
    assert json.loads((ev / 'log.txt').read_text().splitlines()[0])['val_txt_r1'] == record['val_txt_r1']


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    import Retrieval
    cfg = write_config(tiny_config(world), tmp_path / 'cfg.yaml')
    base = ['--config', cfg, '--device', 'cpu', '--no-distributed']
    assert utils.run_cli(Retrieval.main, base + ['--output_dir', str(tmp_path / 'a'), '--evaluate']) == 2
    assert 'error: --evaluate needs --checkpoint' in capsys.readouterr().err
    torch.manual_seed(0)
    ve = models.create_model('ve', dict(TINY_MODEL))
    path = _save_model(ve, tmp_path / 've.pth')
    assert utils.run_cli(Retrieval.main, base + ['--output_dir', str(tmp_path / 'b'), '--evaluate',
                                                 '--checkpoint', path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and 've.pth' in err and '\n' not in err
    with pytest.raises(SystemExit):  # argparse refuses an unknown score mode
        Retrieval.main(base + ['--output_dir', str(tmp_path / 'c'), '--score', 'best'])
    assert "invalid choice: 'best'" in capsys.readouterr().err
