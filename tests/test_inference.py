"""models.load_model (the inference API) and folder search (evaluation/folder_search.py, Predict.py --images).

Fast tests use tiny random models on a mini toy world: every released checkpoint layout loads through the API
into a model without momentum copies or queues, with the online weights of the file; features are unit vectors
whatever the image input type; scores agree with each other; folder features are cached and the cache follows
the folder. Slow tests use the shared toy pretraining: a matching caption scores above a non-matching one, and
folder search finds the image an unambiguous query describes.
"""
import functools
import http.server
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import models
import Predict
import utils
from evaluation.folder_search import FolderIndex, list_images, search
from models.inference import CAPABILITIES, GradCam, _kind_and_config, load_model
from tests.toy import TINY, generate_world, MINI_WORLD_SIZES

QUEUES = ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('inference') / 'world'), 5, **MINI_WORLD_SIZES)


def tiny_config(world, **overrides):
    config = {**TINY, 'text_encoder': os.path.join(world, 'vocab'), 'load_text_weights': False, 'queue_size': 8,
              'momentum': 0.995, 'temp': 0.07, 'alpha': 0.4, 'distill': True, 'vqa_decoder_layers': 1,
              'max_words': 30}
    config.update(overrides)
    return config


def tiny_model(task, world, seed=0):
    """A tiny training model of `task` with every parameter drawn from N(0, 0.5) (momentum copies separately)."""
    config = tiny_config(world)
    torch.manual_seed(seed)
    model = models.create_model(task, config, models.inference._tokenizer(config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, config


def online(sd):
    return {k: v for k, v in sd.items() if '_m.' not in k and k not in QUEUES}


def world_images(world, split='test'):
    with open(os.path.join(world, 'world.json')) as f:
        return [w for w in json.load(f) if w['split'] == split]


@pytest.fixture(scope='module')
def retrieval_ckpt(world, tmp_path_factory):
    model, config = tiny_model('retrieval', world)
    path = str(tmp_path_factory.mktemp('ckpt') / 'checkpoint_best.pth')
    torch.save({'model': model.state_dict(), 'config': config}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Loading every layout
# ----------------------------------------------------------------------------------------------------------------
# (name, training variant it comes from, layout, inference task it loads into)
RELEASED = [('ALBEF.pth', 'pretrain', 'wrapped', 'retrieval'),
            ('ALBEF_4M.pth', 'pretrain', 'wrapped', 'retrieval'),
            ('mscoco.pth', 'retrieval', 'flat', 'retrieval'),
            ('flickr30k.pth', 'retrieval', 'flat', 'retrieval'),
            ('refcoco.pth', 'grounding', 'flat', 'retrieval'),
            ('vqa.pth', 'vqa', 'wrapped', 'vqa'),
            ('pretrain_model_nlvr.pth', 'pretrain_nlvr', 'wrapped', 'pretrain_nlvr'),
            ('our_ve.pth', 've', 'ours', 've'),
            ('our_nlvr.pth', 'nlvr', 'ours', 'nlvr')]


@pytest.mark.parametrize('name,variant,layout,task', RELEASED, ids=[r[0] for r in RELEASED])
def test_every_layout_loads_for_inference(world, tmp_path, name, variant, layout, task):
    src, config = tiny_model(variant, world, seed=3)
    sd = src.state_dict()
    obj = {'flat': online(sd), 'wrapped': {'model': sd}, 'ours': {'model': sd, 'config': config}}[layout]
    path = str(tmp_path / name)
    torch.save(obj, path)
    api = load_model(path, config=None if layout == 'ours' else config, device='cpu')
    assert api.task == task and api.capabilities == CAPABILITIES[task]
    got = api.model.state_dict()
    assert not [k for k in got if '_m.' in k or k in QUEUES], 'inference model holds momentum copies or queues'
    assert not any(p.requires_grad for p in api.model.parameters()) and not api.model.training
    # The online weights of the file arrive unchanged (pretraining files after their BERT prefix is stripped).
    want = {k.replace('text_encoder.bert.', 'text_encoder.'): v for k, v in online(sd).items()}
    for key in ('visual_encoder.pos_embed', 'visual_encoder.blocks.0.attn.qkv.weight',
                'text_encoder.embeddings.word_embeddings.weight', 'vision_proj.weight', 'itm_head.weight',
                'text_decoder.cls.predictions.decoder.weight', 'cls_head.2.weight'):
        if key in got and key in want:
            assert torch.equal(got[key], want[key]), key
    # And half the memory, or less: no momentum copies, no queues.
    n_train = sum(v.numel() for v in sd.values())
    n_infer = sum(v.numel() for v in got.values())
    assert n_infer <= 0.6 * n_train or variant == 'pretrain_nlvr'


def test_released_file_without_config_gets_the_original_config_at_its_resolution():
    grid = 24  # 384 px / 16 px patches: mscoco.pth, flickr30k.pth, refcoco.pth
    flat = {'visual_encoder.pos_embed': torch.zeros(1, 1 + grid * grid, 4), 'itm_head.weight': torch.zeros(2, 4),
            'text_encoder.embeddings.word_embeddings.weight': torch.zeros(3, 4)}
    kind, cfg = _kind_and_config(flat, '/x/mscoco.pth', None, None, None)
    assert kind == 'retrieval' and cfg['image_res'] == 384 and cfg['k_test'] == 256  # Retrieval_coco.yaml
    assert _kind_and_config(flat, 'flickr30k.pth', None, None, None)[1]['k_test'] == 128  # Retrieval_flickr.yaml
    assert 'refcoco_data' in _kind_and_config(flat, 'refcoco.pth', None, None, None)[1]  # Grounding.yaml
    wrapped = {'model': {'visual_encoder.pos_embed': torch.zeros(1, 257, 4),
                         'text_encoder.bert.embeddings.word_embeddings.weight': torch.zeros(3, 4)}}
    kind, cfg = _kind_and_config(wrapped, 'ALBEF.pth', None, 'my/vocab', None)
    assert kind == 'pretrain' and cfg['image_res'] == 256 and cfg['text_encoder'] == 'my/vocab'
    assert _kind_and_config(wrapped, 'ALBEF.pth', None, None, 320)[1]['image_res'] == 320


def test_url_is_downloaded_once_into_the_cache(world, retrieval_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    serve = tmp_path / 'www'
    serve.mkdir()
    shutil.copy(retrieval_ckpt, serve / 'toy_retrieval.pth')
    handler = functools.partial(QuietHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/toy_retrieval.pth'
    try:
        first = load_model(url, device='cpu')
    finally:
        server.shutdown()
        server.server_close()
    assert os.path.isfile(tmp_path / 'hub' / 'checkpoints' / 'toy_retrieval.pth')
    second = load_model(url, device='cpu')  # the server is gone: the cached file serves
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Embeddings, scores, Grad-CAM, answers
# ----------------------------------------------------------------------------------------------------------------
def test_embeddings_are_unit_vectors_for_every_input_type(world, retrieval_ckpt):
    api = load_model(retrieval_ckpt, device='cpu')
    items = world_images(world)[:3]
    paths = [os.path.join(world, 'images', w['file']) for w in items]
    feats = api.embed_images(paths, batch_size=2)
    assert feats.shape == (3, TINY['embed_dim']) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    pil = Image.open(paths[0]).convert('RGB')
    same = [api.embed_images(pil), api.embed_images(np.asarray(pil)), api.embed_images(api.transform(pil)),
            api.embed_images(api.transform(pil)[None]), api.embed_images(paths[0])]
    for f in same:
        torch.testing.assert_close(f, feats[:1], atol=1e-6, rtol=1e-5)
    texts = api.embed_texts(['A red circle!', 'two blue squares', 'a big green triangle'])
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(api.embed_texts('a red circle')[0], texts[0])  # normalised as the original
    torch.testing.assert_close(api.similarity(paths, ['a red circle', 'two blue squares']),
                               feats @ texts[:2].t(), atol=1e-6, rtol=1e-5)


def test_itm_score_pairs_and_agrees_with_gradcam(world, retrieval_ckpt):
    api = load_model(retrieval_ckpt, device='cpu')
    paths = [os.path.join(world, 'images', w['file']) for w in world_images(world)[:3]]
    texts = ['a red circle', 'a small square', 'two objects']
    pairs = api.itm_score(paths, texts, batch_size=2)
    assert pairs.shape == (3,) and ((pairs >= 0) & (pairs <= 1)).all()
    one_image = api.itm_score(paths[0], texts)
    one_text = api.itm_score(paths, texts[0])
    torch.testing.assert_close(one_image[0], pairs[0])
    torch.testing.assert_close(one_text[0], pairs[0])
    assert one_image.shape == one_text.shape == (3,)
    cam = api.gradcam(paths[1], texts[1])
    assert isinstance(cam, GradCam) and cam.words == ['a', 'small', 'square']
    assert cam.sentence_map.shape == (2, 2) and cam.word_maps.shape == (3, 2, 2)  # 16 px / 8 px patches
    assert cam.itm_prob == pytest.approx(float(pairs[1]), abs=1e-5)
    with pytest.raises(utils.UserError, match='cannot be paired'):
        api.itm_score(paths[:2], texts)


def test_capabilities_and_bad_inputs_are_one_line_errors(world, tmp_path):
    src, config = tiny_model('vqa', world)
    path = str(tmp_path / 'vqa.pth')
    torch.save({'model': src.state_dict(), 'config': config}, path)
    api = load_model(path, device='cpu')
    image = os.path.join(world, 'images', world_images(world)[0]['file'])
    with pytest.raises(utils.UserError, match="'vqa' checkpoint .* supports answer, answer_scores"):
        api.embed_images(image)
    with pytest.raises(utils.UserError, match='empty'):
        api.answer(image, ' ?! ', ['yes', 'no'])
    with pytest.raises(utils.UserError, match='non-empty list'):
        api.answer(image, 'what colour?', [])
    with pytest.raises(utils.UserError, match='image file not found'):
        api.answer(str(tmp_path / 'nope.jpg'), 'what colour?', ['red'])
    with pytest.raises(utils.ConfigError, match='precision'):
        load_model(path, precision='int8')


def test_embedded_config_is_validated(world, tmp_path):
    src, config = tiny_model('retrieval', world)
    path = str(tmp_path / 'bad_config.pth')
    torch.save({'model': src.state_dict(), 'config': {**config, 'vision_num_heads': 3}}, path)
    with pytest.raises(utils.ConfigError, match=r'bad_config.pth \(its embedded config\).*vision_num_heads'):
        load_model(path, device='cpu')


def test_bert_config_of_another_checkout_is_found_in_this_one(world, tmp_path):
    """A checkpoint trained in another clone names its bert_config by that clone's absolute path, which may be
    gone: the file of the same name in this repository's configs serves."""
    from tests.toy import ROOT
    config = utils.load_config(os.path.join(ROOT, 'configs', 'toy', 'Grounding.yaml'))
    config.update(bert_config=os.path.join(ROOT, config['bert_config']), text_encoder=os.path.join(world, 'vocab'))
    model = models.create_model('grounding', config, models.inference._tokenizer(config))
    path = str(tmp_path / 'checkpoint_best.pth')
    torch.save({'model': model.state_dict(),
                'config': {**config, 'bert_config': '/gone/clone/configs/toy/config_bert_toy.json'}}, path)
    api = load_model(path, device='cpu')
    assert api.config['bert_config'] == os.path.join(ROOT, 'configs', 'toy', 'config_bert_toy.json')
    assert api.embed_texts('a red circle').shape == (1, config['embed_dim'])


def test_vqa_answer_comes_from_the_list_and_matches_the_model_ranking(world, tmp_path):
    src, config = tiny_model('vqa', world)
    path = str(tmp_path / 'vqa.pth')
    torch.save({'model': src.state_dict(), 'config': config}, path)
    api = load_model(path, device='cpu')
    answers = ['red', 'blue', 'circle', 'two', 'yes', 'no']
    answers_file = tmp_path / 'answer_list.json'
    answers_file.write_text(json.dumps(answers))
    image = os.path.join(world, 'images', world_images(world)[0]['file'])
    ranked = api.answer_scores(image, 'What colour is the circle?', str(answers_file), k=4, top=4)
    assert len(ranked) == 4 and all(a in answers for a, _ in ranked)
    probs = [p for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert api.answer(image, 'What colour is the circle?', answers, k=4) == ranked[0][0]


def test_entailment_and_nlvr_classify(world, tmp_path):
    images = [os.path.join(world, 'images', w['file']) for w in world_images(world)[:2]]
    for task, names, image in (('ve', ('contradiction', 'neutral', 'entailment'), images[0]),
                               ('nlvr', ('false', 'true'), images)):
        src, config = tiny_model(task, world)
        path = str(tmp_path / f'{task}.pth')
        torch.save({'model': src.state_dict(), 'config': config}, path)
        probs = load_model(path, device='cpu').classify(image, 'there is a red circle')
        assert tuple(probs) == names and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Folder search
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def photo_folder(world, tmp_path):
    folder = tmp_path / 'photos'
    (folder / 'sub').mkdir(parents=True)
    for k, w in enumerate(world_images(world)[:6]):
        shutil.copy(os.path.join(world, 'images', w['file']), folder / ('sub' if k % 2 else '') / w['file'])
    (folder / 'notes.txt').write_text('not an image')
    return str(folder)


def test_folder_index_is_cached_and_follows_the_folder(world, retrieval_ckpt, photo_folder, tmp_path):
    api = load_model(retrieval_ckpt, device='cpu')
    cache = str(tmp_path / 'cache')
    assert len(list_images(photo_folder)) == 6 and any(p.startswith('sub') for p in list_images(photo_folder))
    first = FolderIndex.build(api, photo_folder, cache, batch_size=4, progress=False)
    assert not first.cached and first.features.shape == (6, TINY['embed_dim'])
    again = FolderIndex.build(api, photo_folder, cache, progress=False)
    assert again.cached and again.paths == first.paths and torch.equal(again.features, first.features)
    torch.testing.assert_close(first.features, api.embed_images([os.path.join(photo_folder, p)
                                                                 for p in first.paths]))
    # A new image, and an unreadable one: a new entry replaces the old, the broken file is skipped and named.
    shutil.copy(os.path.join(world, 'images', world_images(world)[6]['file']), os.path.join(photo_folder, 'new.jpg'))
    with open(os.path.join(photo_folder, 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG garbage')
    changed = FolderIndex.build(api, photo_folder, cache, progress=False)
    assert not changed.cached and len(changed.paths) == 7 and 'new.jpg' in changed.paths
    assert len(changed.skipped) == 1 and changed.skipped[0].startswith('broken.png')
    assert os.listdir(cache) == [os.path.basename(changed.cache_file)]  # the stale entry is gone
    # A changed model (another config) does not reuse the features.
    other = load_model(retrieval_ckpt, device='cpu', image_res=24)
    assert not FolderIndex.build(other, photo_folder, cache, progress=False).cached
    hits = search(api, changed, 'a red circle', top_k=3, k_rerank=5)
    assert [h['rank'] for h in hits] == [1, 2, 3] and all(os.path.isfile(h['path']) for h in hits)
    itm = [h['itm'] for h in hits]
    assert itm == sorted(itm, reverse=True)


def test_predict_folder_cli_writes_ranking_and_contact_sheet(retrieval_ckpt, photo_folder, tmp_path, capsys):
    import cv2
    out = str(tmp_path / 'result' / 'search.png')
    argv = ['--checkpoint', retrieval_ckpt, '--images', photo_folder, '--query', 'A red circle', '--top_k', '3',
            '--out', out, '--cache_dir', str(tmp_path / 'cache'), '--device', 'cpu', '--tile_size', '64']
    hits = Predict.main(argv)
    printed = capsys.readouterr().out
    assert '| rank | P(match) |' in printed and 'embedded in' in printed
    report = json.load(open(str(tmp_path / 'result' / 'search.json')))
    assert report['images'] == 6 and [h['path'] for h in report['ranking']] == [h['path'] for h in hits]
    assert cv2.imread(out).shape[1] == 3 * 64 + 4 * Predict.PAD
    # The second query reads the cache; existing outputs are kept unless --overwrite.
    rc = utils.run_cli(Predict.main, argv)
    assert rc == 2 and 'exists; pass --overwrite' in capsys.readouterr().err
    Predict.main(argv + ['--overwrite'])
    assert 'features from the cache' in capsys.readouterr().out


@pytest.mark.parametrize('case', ['out_is_input', 'not_png', 'empty_folder', 'missing_folder', 'top_k', 'tile_size'])
def test_predict_refuses_bad_requests_before_writing(retrieval_ckpt, photo_folder, tmp_path, capsys, case):
    image = os.path.join(photo_folder, list_images(photo_folder)[0])
    before = open(image, 'rb').read()
    empty = tmp_path / 'empty'
    empty.mkdir()
    argv = {'out_is_input': ['--image', image, '--caption', 'a circle', '--out', image, '--overwrite'],
            'not_png': ['--image', image, '--caption', 'a circle', '--out', str(tmp_path / 'x.jpg')],
            'empty_folder': ['--images', str(empty), '--query', 'a circle'],
            'missing_folder': ['--images', str(tmp_path / 'nope'), '--query', 'a circle'],
            'top_k': ['--images', photo_folder, '--query', 'a circle', '--top_k', '0'],
            'tile_size': ['--images', photo_folder, '--query', 'a circle', '--tile_size', '100000']}[case]
    if case in ('empty_folder', 'missing_folder', 'top_k', 'tile_size'):
        argv += ['--out', str(tmp_path / 's.png')]
    rc = utils.run_cli(Predict.main, ['--checkpoint', retrieval_ckpt, '--device', 'cpu'] + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith('error: ')
    expect = {'out_is_input': 'is one of the input images', 'not_png': 'ending in .png',
              'empty_folder': 'no image files', 'missing_folder': 'folder not found', 'top_k': '--top_k',
              'tile_size': '--tile_size'}[case]
    assert expect in err
    assert open(image, 'rb').read() == before and not os.path.exists(tmp_path / 's.png')


# ----------------------------------------------------------------------------------------------------------------
# Slow: on the shared toy pretraining, scores mean something
# ----------------------------------------------------------------------------------------------------------------
def full_description(objects) -> str:
    """A caption naming every object by size, colour and shape, in the toy captions' words."""
    from dataset.toyworld import SIZE_WORDS
    parts = [f"{SIZE_WORDS[o['size']][0]} {o['colour']} {o['shape']}" for o in objects]
    parts = [('an ' if p[0] in 'aeiou' else 'a ') + p for p in parts]
    return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _signature(w):
    return tuple(sorted((o['size'], o['colour'], o['shape']) for o in w['objects']))


@pytest.mark.slow
def test_toy_pretraining_scores_matching_captions_higher_and_search_finds_them(toy_world, toy_pretrain, tmp_path):
    api = load_model(os.path.join(toy_pretrain, 'checkpoint_last.pth'), device='cpu')
    assert api.task == 'retrieval' and api.kind == 'pretrain'
    images = world_images(toy_world)[:60]
    paths = [os.path.join(toy_world, 'images', w['file']) for w in images]
    own = [full_description(w['objects']) for w in images]
    # ITM: each image's own description against the next image's (a different set of objects).
    others = [own[(i + 1) % len(own)] for i in range(len(own))]
    keep = [i for i in range(len(own)) if _signature(images[i]) != _signature(images[(i + 1) % len(own)])]
    p_own = api.itm_score([paths[i] for i in keep], [own[i] for i in keep])
    p_other = api.itm_score([paths[i] for i in keep], [others[i] for i in keep])
    itm_wins = float((p_own > p_other).float().mean())
    # Folder search for descriptions that single out one image of the folder.
    folder = tmp_path / 'photos'
    folder.mkdir()
    for p in paths:
        shutil.copy(p, folder)
    counts = {}
    for w in images:
        counts[_signature(w)] = counts.get(_signature(w), 0) + 1
    unique = [i for i, w in enumerate(images) if counts[_signature(w)] == 1]
    index = FolderIndex.build(api, str(folder), str(tmp_path / 'cache'), progress=False)
    top1 = sum(os.path.basename(search(api, index, own[i], top_k=1, k_rerank=8)[0]['path']) == images[i]['file']
               for i in unique) / len(unique)
    print(f'toy pretraining: own description preferred by ITM in {itm_wins:.2f} of {len(keep)} pairs; folder '
          f'search top-1 {top1:.2f} over {len(unique)} unambiguous queries among {len(images)} images '
          f'(chance {1 / len(images):.3f})')
    assert len(keep) >= 50 and itm_wins >= 0.8
    assert len(unique) >= 30 and top1 >= 0.6  # chance 1/60
