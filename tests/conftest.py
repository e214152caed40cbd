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
