"""tools/toy/gradcam_localisation.py: the peak / on-object / chance arithmetic on hand-made maps, the scoring of one
expression, and the whole benchmark on a mini world (a random tiny checkpoint; an oracle map that draws each
object's box scores 100 %)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tools.toy import gradcam_localisation as gl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------------------------
def test_peak_cell_is_the_argmax_row_major_and_none_for_flat_maps():
    m = np.zeros((4, 5))
    m[2, 3] = 1.0
    assert gl.peak_cell(m) == (2, 3)
    m[1, 4] = 1.0  # a tie: the first in row-major order
    assert gl.peak_cell(m) == (1, 4)
    assert gl.peak_cell(-np.arange(20.0).reshape(4, 5)) == (0, 0)  # negative values are fine
    assert gl.peak_cell(np.zeros((3, 3))) is None and gl.peak_cell(np.full((2, 2), 0.7)) is None
    assert gl.peak_cell(np.array([[np.nan, 1.0]])) is None
    with pytest.raises(ValueError):
        gl.peak_cell(np.zeros(4))


def test_cells_on_boxes_uses_cell_centres_in_image_pixels():
    # 96 px image, 8 x 8 grid: cells are 12 px, centres at 6, 18, 30, ...
    on = gl.cells_on_boxes([[13, 25, 14, 14]], (8, 8), (96, 96))  # x 13..26, y 25..38: centre x 18, centre y 30
    assert on.sum() == 1 and on[2, 1]
    on = gl.cells_on_boxes([[6, 0, 12, 7]], (8, 8), (96, 96))  # x 6..17 holds centre 6 (not 18); y 0..6 holds 6
    assert on.sum() == 1 and on[0, 0]
    big = gl.cells_on_boxes([[0, 0, 30, 30]], (8, 8), (96, 96))  # centres 6 and 18 per side
    assert big.sum() == 4 and big[:2, :2].all()
    both = gl.cells_on_boxes([[0, 0, 30, 30], [60, 60, 30, 30]], (8, 8), (96, 96))
    assert both.sum() == 8 and both[5:7, 5:7].all()
    assert not gl.cells_on_boxes([], (8, 8), (96, 96)).any()
    # a non-square image and grid: rows follow the height, columns the width
    on = gl.cells_on_boxes([[0, 40, 10, 10]], (4, 2), (80, 40))  # cells 20 x 20 px, centres x 10, 30; y 10, 30, ..
    assert on.tolist() == [[False, False], [False, False], [False, False], [False, False]]
    on = gl.cells_on_boxes([[0, 45, 11, 10]], (4, 2), (80, 40))  # holds centre (10, 50): row 2, col 0
    assert on[2, 0] and on.sum() == 1


def test_peak_hits_and_chance():
    on = np.zeros((4, 4), dtype=bool)
    on[1, 1] = on[1, 2] = True
    m = np.zeros((4, 4))
    m[1, 2] = 3.0
    assert gl.peak_hits(m, on)
    m[3, 3] = 5.0
    assert not gl.peak_hits(m, on)
    assert not gl.peak_hits(np.zeros((4, 4)), on)  # no peak, no hit
    assert gl.chance(on) == pytest.approx(2 / 16)
    with pytest.raises(ValueError):
        gl.peak_hits(np.ones((3, 3)), on)

    t = gl.Tally()
    assert t.report() == {'value': None, 'chance': None, 'n': 0}
    t.add(m, on)  # miss, chance 1/8
    m2 = np.zeros((4, 4))
    m2[1, 1] = 1.0
    full = np.ones((4, 4), dtype=bool)
    t.add(m2, full)  # hit, chance 1
    assert t.report() == {'value': 50.0, 'chance': round(100 * (2 / 16 + 1) / 2, 1), 'n': 2}


def _expr(text, target, objects):
    return gl.Expression('x.jpg', (96, 96), text, 'val', target, objects)


def test_score_expression_sorts_maps_by_word_and_kind():
    red_circle = {'shape': 'circle', 'colour': 'red', 'size': 'big', 'box': [0, 0, 30, 30]}     # cells rows/cols 0-1
    red_square = {'shape': 'square', 'colour': 'red', 'size': 'small', 'box': [60, 60, 16, 16]}  # cell (5, 5)
    blue_circle = {'shape': 'circle', 'colour': 'blue', 'size': 'small', 'box': [60, 0, 16, 16]}  # cell (0, 5)
    objects = [red_circle, blue_circle, red_square]

    def at(r, c):
        m = np.zeros((8, 8), np.float32)
        m[r, c] = 1.0
        return m

    tallies = gl.new_tallies()
    # 'the red circle': 'red' peaks on the red square (a red object: hit), 'circle' on the blue circle (hit),
    # 'the' is no attribute word; the whole map peaks on the background (miss)
    gl.score_expression(tallies, _expr('The red circle.', red_circle, objects), ['the', 'red', 'circle'],
                        np.stack([at(7, 0), at(5, 5), at(0, 5)]), at(7, 7))
    # 'the leftmost circle' (position): 'circle' peaks on the red square (miss); whole map on the target (hit)
    gl.score_expression(tallies, _expr('the leftmost circle', red_circle, objects), ['the', 'leftmost', 'circle'],
                        np.stack([at(0, 0), at(0, 0), at(5, 5)]), at(1, 1))
    r = {k: t.report() for k, t in tallies.items()}
    assert r['colour_word'] == {'value': 100.0, 'chance': round(100 * 5 / 64, 1), 'n': 1}
    assert r['shape_word'] == {'value': 50.0, 'chance': round(100 * 5 / 64, 1), 'n': 2}
    assert r['whole_attribute_named'] == {'value': 0.0, 'chance': round(100 * 4 / 64, 1), 'n': 1}
    assert r['whole_position_named'] == {'value': 100.0, 'chance': round(100 * 4 / 64, 1), 'n': 1}


def test_table_lists_every_measure_with_chance():
    result = {k: {'value': 50.0, 'chance': 10.0, 'n': 3} for k in gl.MEASURES}
    result['whole_position_named'] = {'value': None, 'chance': None, 'n': 0}
    table = gl.format_table(result, {'block_num': 2, 'grid': [8, 8], 'images': 1, 'expressions': 2})
    for k in gl.MEASURES:
        assert f'| {k} |' in table
    assert '| 50.0 | 10.0 | 3 |' in table and '| - | - | 0 |' in table


# ----------------------------------------------------------------------------------------------------------------
# End to end on a mini world (seconds)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mini(tmp_path_factory):
    """A small toy world (64 px model on its 96 px images, like the demo) and a random toy grounding checkpoint."""
    import engine
    import models
    import utils
    from tests.toy import generate_world, make_toy_config
    work = tmp_path_factory.mktemp('gradcam_localisation')
    world = generate_world(str(work / 'world'), 3, train_images=8, val_images=6, test_images=6)
    cfg = utils.load_config(make_toy_config('Grounding', world, str(work / 'Grounding.yaml')))
    torch.manual_seed(0)
    model = models.create_model('grounding', cfg, engine.build_tokenizer(cfg))
    ckpt = str(work / 'random.pth')
    torch.save({'model': model.state_dict(), 'config': cfg}, ckpt)
    return world, ckpt


def test_expressions_carry_their_objects(mini):
    world, _ = mini
    expressions = gl.load_expressions(world)
    with open(os.path.join(world, 'refcoco+_val.json')) as f:
        val = json.load(f)
    with open(os.path.join(world, 'refcoco+_test.json')) as f:
        test = json.load(f)
    assert sorted(e.text for e in expressions) == sorted(it['text'] for it in val + test)
    for e in expressions:
        assert e.target in e.objects and e.split in gl.HELD_OUT_SPLITS and e.image_hw == (96, 96)
    first_image = expressions[0].image_path
    limited = gl.load_expressions(world, limit=1)
    assert limited and {e.image_path for e in limited} == {first_image}


def test_benchmark_end_to_end_and_with_oracle_maps(mini):
    world, ckpt = mini
    result, info = gl.measure(ckpt, world, batch_size=5)
    expressions = gl.load_expressions(world)
    words = [w for e in expressions for w in e.text.lower().strip('.').split()]
    assert result['colour_word']['n'] == sum(w in gl.COLOUR_NAMES for w in words)
    assert result['shape_word']['n'] == sum(w in gl.SHAPES for w in words)
    n_pos = sum(e.by_position for e in expressions)
    assert result['whole_position_named']['n'] == n_pos
    assert result['whole_attribute_named']['n'] == len(expressions) - n_pos
    assert info == {'block_num': 2, 'rule': 'centre', 'images': len({e.image_path for e in expressions}),
                    'expressions': len(expressions), 'grid': [8, 8]}
    for k in gl.MEASURES:
        r = result[k]
        if r['n']:
            assert 0.0 <= r['value'] <= 100.0 and 0.0 < r['chance'] < 100.0

    # Oracle maps (each word's map lights its objects' boxes, the whole map the target): every share is 100 %.
    tallies = gl.new_tallies()
    for e in expressions:
        ws = e.text.lower().strip('.').split()
        maps = [gl.cells_on_boxes([o['box'] for o in e.objects if w in (o['colour'], o['shape'])], (8, 8),
                                  e.image_hw).astype(np.float32) for w in ws]
        gl.score_expression(tallies, e, ws, np.stack(maps),
                            gl.cells_on_boxes([e.target['box']], (8, 8), e.image_hw).astype(np.float32))
    assert all(t.report()['value'] == 100.0 for t in tallies.values() if t.n)

    r = subprocess.run([sys.executable, '-m', 'tools.toy.gradcam_localisation', '--checkpoint', ckpt, '--world', world,
                        '--json', '--limit', '3'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(line) == set(gl.MEASURES) and all(set(v) == {'value', 'chance', 'n'} for v in line.values())
    r = subprocess.run([sys.executable, '-m', 'tools.toy.gradcam_localisation', '--checkpoint', ckpt, '--world', world,
                        '--block_num', '9'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'outside the fusion layers' in r.stderr
    r = subprocess.run([sys.executable, '-m', 'tools.toy.gradcam_localisation', '--checkpoint', ckpt + '.nope',
                        '--world', world], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and '--checkpoint' in r.stderr


def test_cell_cover_and_overlap_rule():
    # 96 px, 8 x 8: cells of 12 x 12 px. Box x 6..17 (w 12), y 0..5 (h 6): half of cell (0, 0)'s width and half its
    # height -> 1/4; the other half of its width lies in cell (0, 1) -> 1/4 too.
    cover = gl.cell_cover([[6, 0, 12, 6]], (8, 8), (96, 96))
    assert cover[0, 0] == pytest.approx(0.25) and cover[0, 1] == pytest.approx(0.25)
    assert cover.sum() == pytest.approx(12 * 6 / 144)
    full = gl.cell_cover([[0, 0, 96, 96]], (8, 8), (96, 96))
    np.testing.assert_allclose(full, 1.0)
    assert not gl.cell_cover([], (8, 8), (96, 96)).any()
    # overlap: every touched cell; centre: only the cell whose centre is inside (6, 6 lies in the box x 6..17)
    assert gl.cells_on_boxes([[6, 0, 12, 7]], (8, 8), (96, 96), 'overlap').sum() == 2
    assert gl.cells_on_boxes([[6, 0, 12, 7]], (8, 8), (96, 96), 'centre').sum() == 1
    # a 14 px box at x 13: centre rule 1 cell per side (centre 18), overlap rule 2 (cells 1 and 2)
    assert gl.cells_on_boxes([[13, 13, 14, 14]], (8, 8), (96, 96), 'overlap').sum() == 4
    with pytest.raises(ValueError):
        gl.cells_on_boxes([[0, 0, 5, 5]], (8, 8), (96, 96), 'nearby')
