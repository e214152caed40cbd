"""Exact parity of pre_caption / pre_question with the original (fixture text_preprocessing.json).

The fixture folder comes from env ALBEF_REF_DIR (default ../shared/fixtures/albef_ref_public relative to the repo
root), through the `ref_dir` fixture of conftest.py.
"""
import json
import os

import pytest

from dataset.utils import pre_caption, pre_question

CASES = [(fn_name, fn, max_words)
         for fn_name, fn in (('pre_caption', pre_caption), ('pre_question', pre_question))
         for max_words in (30, 8)]


@pytest.fixture(scope='module')
def entries(ref_dir):
    with open(os.path.join(ref_dir, 'text_preprocessing.json'), encoding='utf-8') as f:
        data = json.load(f)
    assert isinstance(data, list) and data, 'text_preprocessing.json must be a non-empty list'
    return data


@pytest.mark.parametrize('fn_name,fn,max_words', CASES, ids=[f'{n}_max{m}' for n, _, m in CASES])
def test_parity_text_all_entries(entries, fn_name, fn, max_words):
    key = f'{fn_name}_max{max_words}'
    mismatches = [(e['input'], fn(e['input'], max_words), e[key]) for e in entries
                  if fn(e['input'], max_words) != e[key]]
    assert not mismatches, f'{len(mismatches)} of {len(entries)} differ, first: {mismatches[0]!r}'


def test_parity_text_fixture_covers_every_key(entries):
    # Every entry must carry all four reference outputs, so the test above really checks all of them.
    for e in entries:
        for fn_name, _, m in CASES:
            assert f'{fn_name}_max{m}' in e


def test_parity_text_rules_spelled_out():
    # The original's text rules on inputs not in the fixture.
    assert pre_caption('A <PERSON> walks') == 'a person walks'       # lower-case first, then the tag rule
    assert pre_question('<person> here?') == '<person> here'          # no tag rule for questions
    assert pre_caption('a\tb') == 'a\tb'                              # single tab survives
    assert pre_caption('a\t\tb') == 'a b'                             # runs of >= 2 collapse
    assert pre_question('  a  b  ', 3) == '  a'                       # empty words count toward the limit
    assert pre_caption(' '.join(['w'] * 60)) == ' '.join(['w'] * 50)  # default max_words 50
