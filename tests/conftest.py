"""Shared test fixtures: repository root on sys.path, the reference-fixture folder, a cheap toy world."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing may be downloaded at test time


@pytest.fixture(scope='session')
def ref_dir():
    """The folder of reference vectors from the original code (env ALBEF_REF_DIR overrides)."""
    path = os.environ.get('ALBEF_REF_DIR', os.path.join(ROOT, '..', 'shared', 'fixtures', 'albef_ref_public'))
    if not os.path.isdir(path):
        pytest.fail(f'reference fixtures not found at {path} (set ALBEF_REF_DIR)')
    return os.path.abspath(path)


@pytest.fixture(scope='session')
def toy_world(tmp_path_factory):
    """A freshly seeded toy world for the learning tests (seed from env TOY_SEED, default 1)."""
    from tests.toy import generate_world
    seed = int(os.environ.get('TOY_SEED', '1'))
    return generate_world(str(tmp_path_factory.mktemp('toy') / f'world_seed{seed}'), seed)


@pytest.fixture(scope='session')
def toy_pretrain(toy_world, tmp_path_factory):
    """One toy pretraining shared by every learning test: returns its output folder (checkpoint_last.pth, log.txt).

    Concurrent pytest sessions on one machine share it through a cache keyed on the hash of everything the
    result depends on (code, toy config, world arguments, torch version); a lock makes them wait for one run, and
    entries of older keys are deleted once no session holds them.
    """
    from tests.toy import pretrain_cached
    with pretrain_cached(toy_world, str(tmp_path_factory.getbasetemp().parent / 'albef_toy_pretrain_cache')) as out:
        yield out
