"""Predict.py: the PNG grid (size, titles), Predictor reuse, the released flat checkpoint layout, one-line errors
for bad input, and (slow) that the map of a toy object's caption peaks inside that object's box after toy training.
"""
import json
import os

import cv2
import numpy as np
import pytest
import torch

import engine
import models
import utils
import Predict
from tests.toy import generate_world, make_toy_config


@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp('predict') / 'world'), 3, train_images=8, val_images=4,
                          test_images=4)


@pytest.fixture(scope='module')
def random_ckpt(small_world, tmp_path_factory):
    """A randomly initialised toy grounding model saved as our checkpoints are ({'model', 'config'})."""
    work = tmp_path_factory.mktemp('predict_ckpt')
    cfg_path = make_toy_config('Grounding', small_world, str(work / 'Grounding.yaml'))
    config = utils.load_config(cfg_path)
    torch.manual_seed(0)
    model = models.create_model('grounding', config, engine.build_tokenizer(config))
    path = str(work / 'random.pth')
    torch.save({'model': model.state_dict(), 'config': config}, path)
    flat = {k: v for k, v in model.state_dict().items()
            if '_m.' not in k and not k.endswith(('queue', 'queue_ptr'))}  # the released refcoco.pth layout
    torch.save(flat, str(work / 'flat.pth'))
    return path, cfg_path, str(work / 'flat.pth')


def _image(world, k=0):
    with open(os.path.join(world, 'world.json')) as f:
        w = json.load(f)[k]
    return os.path.join(world, 'images', w['file']), w


def test_cli_writes_grid_png(small_world, random_ckpt, tmp_path, capsys):
    ckpt, _, _ = random_ckpt
    image, _ = _image(small_world)
    out = str(tmp_path / 'out.png')
    preds = Predict.main(['--checkpoint', ckpt, '--image', image, '--caption', 'The big red circle!', '--out', out,
                          '--device', 'cpu', '--tile_size', '128', '--cols', '3'])
    printed = capsys.readouterr().out
    assert 'ITM match probability' in printed and out in printed
    pred = preds[0]
    assert pred.caption == 'the big red circle' and pred.words == ['the', 'big', 'red', 'circle']
    assert pred.sentence_map.shape == (8, 8) and pred.word_maps.shape == (4, 8, 8)  # 64 px / 8 px patches
    assert 0.0 <= pred.itm_prob <= 1.0
    png = cv2.imread(out)
    n_tiles = 2 + len(pred.words)  # image, whole caption, one per word
    assert png.shape[:2] == Predict.grid_shape(n_tiles, pred.image.shape[:2], 128, 3)
    assert png.shape[:2] == (2 * (128 + Predict.TITLE_H) + 3 * Predict.PAD, 3 * 128 + 4 * Predict.PAD)
    # The first tile is the image itself (resized), the second differs from it (the overlay).
    y, x = Predict.PAD + Predict.TITLE_H, Predict.PAD
    first = png[y:y + 128, x:x + 128, ::-1]
    expected = cv2.resize(pred.image, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    second = png[y:y + 128, x + 128 + Predict.PAD:x + 256 + Predict.PAD, ::-1]
    assert np.abs(second.astype(int) - expected.astype(int)).max() > 20


def test_predictor_loads_once_and_handles_several_images(small_world, random_ckpt, tmp_path):
    ckpt, _, _ = random_ckpt
    p = Predict.Predictor(ckpt, device='cpu')
    a, b = _image(small_world, 0)[0], _image(small_world, 1)[0]
    both = p.predict([a, b], 'red circle')
    one = p.predict(b, 'red circle')
    assert [x.image_path for x in both] == [a, b]
    np.testing.assert_allclose(both[1].sentence_map, one[0].sentence_map, rtol=1e-4, atol=1e-10)
    assert p.block_num == 2  # toy: 2 fusion layers (2, 3) -> the first, never the last
    out = str(tmp_path / 'many.png')
    Predict.main(['--checkpoint', ckpt, '--image', a, b, '--caption', 'a circle', '--out', out, '--device', 'cpu'])
    assert os.path.isfile(str(tmp_path / 'many_0.png')) and os.path.isfile(str(tmp_path / 'many_1.png'))


def test_released_flat_layout_with_config(small_world, random_ckpt, tmp_path):
    ckpt, cfg, flat = random_ckpt
    image = _image(small_world)[0]
    ref = Predict.Predictor(ckpt, device='cpu').predict(image, 'the red circle')[0]
    got = Predict.Predictor(flat, config=cfg, device='cpu').predict(image, 'the red circle')[0]
    np.testing.assert_allclose(got.sentence_map, ref.sentence_map, rtol=1e-5, atol=1e-12)
    assert got.itm_prob == pytest.approx(ref.itm_prob, abs=1e-6)


@pytest.mark.parametrize('case', ['bad_image', 'missing_image', 'empty_caption', 'block_num', 'missing_ckpt'])
def test_bad_input_gives_one_line_error(small_world, random_ckpt, tmp_path, capsys, case):
    ckpt = random_ckpt[0]
    image = _image(small_world)[0]
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not an image')
    argv = {'bad_image': ['--image', str(broken), '--caption', 'a circle'],
            'missing_image': ['--image', str(tmp_path / 'nope.png'), '--caption', 'a circle'],
            'empty_caption': ['--image', image, '--caption', ' ?!. '],
            'block_num': ['--image', image, '--caption', 'a circle', '--block_num', '4'],
            'missing_ckpt': ['--image', image, '--caption', 'a circle']}[case]
    ck = str(tmp_path / 'nope.pth') if case == 'missing_ckpt' else ckpt
    rc = utils.run_cli(Predict.main, ['--checkpoint', ck, '--out', str(tmp_path / 'x.png'), '--device', 'cpu']
                       + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith('error: ')
    expect = {'bad_image': 'broken.jpg', 'missing_image': 'nope.png', 'empty_caption': '--caption is empty',
              'block_num': '--block_num 4 is outside the fusion layers', 'missing_ckpt': 'nope.pth'}[case]
    assert expect in err
    assert not os.path.exists(tmp_path / 'x.png')
