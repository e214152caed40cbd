"""tests/toy.py: the shared toy pretraining's cache deletes what older code left behind, never what is in use."""
import fcntl
import os

from tests.toy import prune_cache


def _entry(root, key):
    os.makedirs(root / key)
    (root / key / 'checkpoint_last.pth').write_bytes(b'x' * 100)
    (root / f'{key}.yaml').write_text('batch_size: 2\n')
    (root / f'{key}.lock').touch()


def test_prune_cache_deletes_unheld_stale_entries_only(tmp_path):
    for key in ('current', 'stale', 'busy'):
        _entry(tmp_path, key)
    (tmp_path / 'gone.lock').touch()  # deleted earlier: only its lock file is left
    with open(tmp_path / 'busy.lock') as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # another session reading its (older) pretraining
        assert prune_cache(str(tmp_path), keep='current') == ['stale']
    assert sorted(os.listdir(tmp_path)) == ['busy', 'busy.lock', 'busy.yaml', 'current', 'current.lock',
                                            'current.yaml', 'gone.lock', 'stale.lock']
    assert prune_cache(str(tmp_path), keep='current') == ['busy']  # released: now it goes too
    assert (tmp_path / 'current' / 'checkpoint_last.pth').stat().st_size == 100
