"""The toy world's supervised image tower (dataset/toyworld/supervised_vit.py): masks, training, the weights file."""
import json
import os
import subprocess
import sys

import torch

from tests.toy import MINI_WORLD_SIZES, TINY, generate_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_object_masks_cover_the_patches_inside_each_box():
    from dataset.toyworld.supervised_vit import object_masks
    # a 20x20 box at (40, 0) of an 80 px image on a 4x4 grid covers the patch centred at (50, 10) only; a box
    # too small to hold a patch centre still gets the patch under its centre
    masks = object_masks([{'box': [40, 0, 20, 20]}, {'box': [0, 0, 3, 3]}, {'box': [0, 40, 40, 40]}], 80, 4)
    assert masks[0].nonzero().flatten().tolist() == [2] and masks[1].nonzero().flatten().tolist() == [0]
    assert masks[2].nonzero().flatten().tolist() == [8, 9, 12, 13]


def test_train_on_attributes_moves_the_vit_and_reports_each_attribute(tmp_path):
    from dataset.toyworld.supervised_vit import train_on_attributes
    from models.vit import build_vit
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    torch.manual_seed(0)
    vit = build_vit(TINY)
    before = [p.detach().clone() for p in vit.parameters()]
    curve = train_on_attributes(world, vit, TINY['image_res'], TINY['patch_size'], ('size', 'shape'), steps=3,
                                batch=4, report=(1,))
    assert [s for s, _ in curve] == [1, 3]
    assert all(set(acc) == {'size', 'shape'} and all(0 <= v <= 100 for v in acc.values()) for _, acc in curve)
    assert any(not torch.equal(a, b) for a, b in zip(before, vit.parameters()))


def test_centre_bins_name_the_cell_of_each_object_centre():
    from dataset.toyworld.supervised_vit import centre_bins
    image = {'size': [96, 96], 'objects': [{'box': [0, 0, 10, 10]}, {'box': [90, 40, 6, 20]}, {'box': [40, 88, 8, 8]}]}
    # centres (5, 5), (93, 50), (44, 92) on a 16-cell grid of 6 px cells; on a 2-cell grid, halves
    assert centre_bins(image, 16) == [{'x': 0, 'y': 0}, {'x': 15, 'y': 8}, {'x': 7, 'y': 15}]
    assert centre_bins(image, 2) == [{'x': 0, 'y': 0}, {'x': 1, 'y': 1}, {'x': 0, 'y': 1}]


def test_position_heads_train_and_report_column_and_row(tmp_path):
    from dataset.toyworld.supervised_vit import train_on_attributes
    from models.vit import build_vit
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    torch.manual_seed(0)
    vit = build_vit(TINY)
    curve = train_on_attributes(world, vit, TINY['image_res'], TINY['patch_size'], ('colour',), steps=2, batch=4,
                                report=(), position_bins=4)
    assert [s for s, _ in curve] == [2] and set(curve[0][1]) == {'colour', 'x', 'y'}


def test_supervised_vit_file_loads_as_vision_pretrained_and_is_reused_until_its_inputs_change(tmp_path, capsys):
    from dataset.toyworld.supervised_vit import WEIGHTS_NAME, ensure_supervised_vit
    from models.pretrained import load_vision_weights
    from models.vit import build_vit
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    path = ensure_supervised_vit(world, TINY, steps=2, log_every=1)
    assert path == os.path.join(world, WEIGHTS_NAME)
    out = capsys.readouterr().out
    assert 'step 1/2' in out and 'step 2/2' in out and 'wrote' in out
    with open(os.path.join(world, 'vit_supervised.json')) as f:
        record = json.load(f)
    assert record['made_from']['steps'] == 2 and record['made_from']['vit']['vision_width'] == TINY['vision_width']
    assert record['made_from']['world']['seed'] == 0 and record['test_accuracy'][-1][0] == 2

    saved = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    untrained = build_vit(TINY)
    fresh = build_vit(TINY)
    load_vision_weights(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert any(not torch.equal(saved[k], v) for k, v in untrained.state_dict().items())  # it trained

    mtime = os.stat(path).st_mtime_ns
    ensure_supervised_vit(world, TINY, steps=2)
    assert 'up to date' in capsys.readouterr().out and os.stat(path).st_mtime_ns == mtime
    ensure_supervised_vit(world, TINY, steps=3, log_every=0)  # other steps: retrained
    assert 'wrote' in capsys.readouterr().out
    with open(os.path.join(world, 'vit_supervised.json')) as f:
        record = json.load(f)
    record['made_from']['recipe'] -= 1  # made by an older training recipe: retrained
    with open(os.path.join(world, 'vit_supervised.json'), 'w') as f:
        json.dump(record, f)
    ensure_supervised_vit(world, TINY, steps=3, log_every=0)
    assert 'wrote' in capsys.readouterr().out
    os.remove(os.path.join(world, 'vit_supervised.json'))  # weights without their record (an interrupted run)
    ensure_supervised_vit(world, TINY, steps=3, log_every=0)
    assert 'wrote' in capsys.readouterr().out
    ensure_supervised_vit(world, TINY, steps=3, log_every=0, position_bins=4)  # with position heads: retrained
    assert 'wrote' in capsys.readouterr().out
    with open(os.path.join(world, 'vit_supervised.json')) as f:
        record = json.load(f)
    assert record['made_from']['position_bins'] == 4 and set(record['test_accuracy'][-1][1]) >= {'x', 'y'}
    ensure_supervised_vit(world, TINY, steps=3, log_every=0, position_bins=4)
    assert 'up to date' in capsys.readouterr().out


def test_supervised_vit_cli_names_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'dataset.toyworld.supervised_vit', '--world', str(tmp_path / 'nowhere')],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'world.json' in r.stderr and 'nowhere' in r.stderr
    r = subprocess.run([sys.executable, '-m', 'dataset.toyworld.supervised_vit', '--steps', '0'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and '--steps 0' in r.stderr
    r = subprocess.run([sys.executable, '-m', 'dataset.toyworld.supervised_vit', '--position-bins', '1'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and '--position-bins 1' in r.stderr
