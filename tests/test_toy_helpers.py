"""tests/toy.py: the shared toy pretraining's cache deletes what older code left behind, never what is in use or
another world's."""
import fcntl
import json
import os

from tests.toy import _content_key, prune_cache


def _entry(root, key):
    os.makedirs(root / key)
    (root / key / 'checkpoint_last.pth').write_bytes(b'x' * 100)
    (root / f'{key}.yaml').write_text('batch_size: 2\n')
    (root / f'{key}.lock').touch()


def test_prune_cache_deletes_unheld_stale_entries_of_the_same_world_only(tmp_path):
    for key in ('w1-current', 'w1-stale', 'w1-busy', 'w2-other', 'legacy'):
        _entry(tmp_path, key)
    (tmp_path / 'w1-gone.lock').touch()  # deleted earlier: only its lock file is left
    with open(tmp_path / 'w1-busy.lock') as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # another session reading its (older) pretraining
        assert prune_cache(str(tmp_path), keep='w1-current') == ['legacy', 'w1-stale']
    assert sorted(os.listdir(tmp_path)) == [
        'legacy.lock', 'w1-busy', 'w1-busy.lock', 'w1-busy.yaml', 'w1-current', 'w1-current.lock', 'w1-current.yaml',
        'w1-gone.lock', 'w1-stale.lock', 'w2-other', 'w2-other.lock', 'w2-other.yaml']
    assert prune_cache(str(tmp_path), keep='w1-current') == ['w1-busy']  # released: now it goes too
    assert (tmp_path / 'w1-current' / 'checkpoint_last.pth').stat().st_size == 100
    assert prune_cache(str(tmp_path), keep='w2-new') == ['w2-other']  # a new code hash for the other world


def test_content_key_is_world_then_code(tmp_path):
    world = tmp_path / 'w'
    world.mkdir()
    (world / 'manifest.json').write_text(json.dumps({'format_version': 1, 'args': {'seed': 1}}))
    key = _content_key(str(world))
    (world / 'manifest.json').write_text(json.dumps({'format_version': 1, 'args': {'seed': 2}}))
    other = _content_key(str(world))
    assert key.split('-')[1] == other.split('-')[1] and key.split('-')[0] != other.split('-')[0]
    assert [len(p) for p in key.split('-')] == [8, 16]
