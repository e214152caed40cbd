"""Fuzzing the parsers of user input with hypothesis: the config loader and every annotation parser in dataset/.

Inputs are structured (random values under the keys a parser expects, mixed with random keys and random JSON or
YAML), so that most examples get past the first check. The only exceptions allowed out are our one-line errors
(utils.UserError subclasses: ConfigError, DataError); anything else (TypeError, KeyError, RecursionError...) is a
bug in the parser. Example counts are modest so that the file runs in seconds.
"""
import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The owners of the config's blocks and model checks declare them when imported.
import models  # noqa: F401
import optim  # noqa: F401
import scheduler  # noqa: F401
import utils
from dataset import (grounding_dataset, nlvr_dataset, pretrain_dataset, re_eval_dataset, re_train_dataset,
                     ve_dataset, vqa_dataset)
from dataset.utils import load_answer_list

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def plausible(key_values: dict):
    """Items (dicts) whose keys come from `key_values` (each with its plausible values or any JSON value), plus a
    random extra key now and then; some keys are left out."""
    fields = {k: st.one_of(v, json_values) for k, v in key_values.items()}
    item = st.fixed_dictionaries({}, optional={**fields, 'extra': json_values})
    return st.one_of(st.lists(item, max_size=4), json_values)


paths = st.one_of(st.sampled_from(['a.jpg', 'sub/b.png', '../up.jpg', '/etc/passwd', 'x/../../y.jpg', '']),
                  st.text(max_size=10))
strings = st.text(max_size=20)
string_lists = st.lists(strings, max_size=3)

ANNOTATION_SHAPES = {
    'pretrain': {'image': paths, 'caption': st.one_of(strings, string_lists)},
    're_train': {'image': paths, 'caption': strings, 'image_id': st.one_of(strings, st.integers())},
    're_eval': {'image': paths, 'caption': string_lists},
    'vqa_train': {'image': paths, 'question': strings, 'dataset': st.sampled_from(['vqa', 'vg', 'coco']),
                  'answer': st.one_of(strings, string_lists)},
    'vqa_test': {'image': paths, 'question': strings, 'dataset': st.sampled_from(['vqa', 'vg']),
                 'question_id': st.one_of(st.integers(), strings), 'answer': string_lists},
    'nlvr': {'images': st.lists(paths, max_size=3), 'sentence': strings,
             'label': st.sampled_from(['True', 'False', 'true', True, 1])},
    've': {'image': paths, 'sentence': strings,
           'label': st.sampled_from(['entailment', 'neutral', 'contradiction', 'yes', 2])},
    'grounding_train': {'image': paths, 'text': strings},
    'grounding_test': {'image': paths, 'text': strings, 'ref_id': st.one_of(st.integers(), strings)},
}


def build(kind: str, ann: str, root: str, answer_list: str):
    """The dataset of `kind` on annotation file `ann` (images under `root`), as create_dataset builds it."""
    if kind == 'pretrain':
        return pretrain_dataset(ann, None)
    if kind == 're_train':
        return re_train_dataset(ann, None, root)
    if kind == 're_eval':
        return re_eval_dataset(ann, None, root)
    if kind == 'vqa_train':
        return vqa_dataset(ann, None, root, root, split='train')
    if kind == 'vqa_test':
        return vqa_dataset(ann, None, root, None, split='test', answer_list=answer_list)
    if kind == 'nlvr':
        return nlvr_dataset(ann, None, root)
    if kind == 've':
        return ve_dataset(ann, None, root)
    return grounding_dataset(ann, None, root, mode=kind.split('_')[1])


@pytest.fixture(scope='module')
def scratch():
    """A folder for the generated files (hypothesis reruns the test body, so no function-scoped tmp_path)."""
    path = tempfile.mkdtemp(prefix='albef_fuzz_')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dump(folder: str, name: str, obj) -> str:
    path = os.path.join(folder, name)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f)  # NaN / Infinity are written as JSON extensions, which json.load reads back
    return path


# ----------------------------------------------------------------------------------------------------------------
# Annotation parsers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', sorted(ANNOTATION_SHAPES))
def test_annotation_parsers_raise_only_data_errors(kind, scratch):
    answers = _dump(scratch, 'answers.json', ['yes', 'no'])

    @FUZZ
    @given(content=plausible(ANNOTATION_SHAPES[kind]))
    def check(content):
        ann = _dump(scratch, f'{kind}.json', content)
        try:
            ds = build(kind, ann, os.path.join(scratch, 'images'), answers)
        except utils.UserError:
            return
        assert len(ds) == len(content) > 0
        try:  # reading an item opens its image: a missing one must be a DataError too
            ds[0]
        except utils.UserError:
            pass

    check()


@FUZZ
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode('latin-1'))))
def test_annotation_loader_on_arbitrary_text(text, scratch):
    path = os.path.join(scratch, 'raw.json')
    with open(path, 'w', encoding='utf-8', errors='surrogatepass') as f:
        f.write(text)
    try:
        pretrain_dataset(path, None)
    except utils.UserError:
        pass


@FUZZ
@given(content=json_values)
def test_answer_list_parser(content, scratch):
    path = _dump(scratch, 'answer_list.json', content)
    try:
        answers = load_answer_list(path)
    except utils.UserError:
        return
    assert answers and all(isinstance(a, str) for a in answers)


# ----------------------------------------------------------------------------------------------------------------
# Config loader
# ----------------------------------------------------------------------------------------------------------------
# Keys of the nested blocks (optimizer, schedular, augment), so that their value checks are reached too.
BLOCK_KEYS = set().union(*utils.registered_blocks().values())


def _schema_value(types: tuple):
    """Values of the types a schema key accepts, mixed with values of other types."""
    own = {int: st.integers(-3, 3), float: st.floats(allow_nan=True, allow_infinity=True), bool: st.booleans(),
           str: st.text(max_size=8), list: st.lists(scalars, max_size=3), dict: st.dictionaries(
               st.one_of(st.sampled_from(sorted(BLOCK_KEYS)), st.text(max_size=6), st.integers(), st.none()),
               st.one_of(scalars, st.lists(st.sampled_from(['Rotate', 'Rotat', 'Identity']), max_size=2)),
               max_size=4), type(None): st.none()}
    return st.one_of(*[own[t] for t in types if t in own], json_values)


def _typed_config(keys):
    """Configs over `keys` whose values are mostly of the key's schema type (so the range checks are reached)."""
    return st.dictionaries(keys, st.none(), max_size=6).flatmap(
        lambda d: st.fixed_dictionaries({k: _schema_value(utils.CONFIG_SCHEMA[k]) for k in d}))


config_dicts = st.one_of(
    _typed_config(st.sampled_from(sorted(utils.CONFIG_SCHEMA))),
    _typed_config(st.sampled_from(['optimizer', 'schedular', 'scheduler', 'augment', 'queue_size', 'batch_size'])),
    st.dictionaries(st.one_of(st.sampled_from(sorted(utils.CONFIG_SCHEMA)), st.text(max_size=10), st.integers()),
                    json_values, max_size=4))


@FUZZ
@given(config=st.one_of(config_dicts, json_values))
def test_validate_config_raises_only_config_errors(config):
    try:
        utils.validate_config(config, 'fuzz.yaml')
    except utils.ConfigError as e:
        assert str(e).startswith('fuzz.yaml')  # names the file (run_cli keeps the printed message on one line)


yaml_texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(st.sampled_from(sorted(utils.CONFIG_SCHEMA) + ['optimizer.lr', 'bogus', '- x', '&a', '*a']),
                       st.sampled_from(['1', '-1', '0', '1e-4', '.nan', '.inf', 'true', 'null', "'s'", '[1, 2]',
                                        '{opt: adamW, lr: 1}', '!!python/object/apply:os.system ["true"]', '&a [*a]',
                                        '*undefined', '{', '"', '\t'])),
             max_size=6).map(lambda kv: ''.join(f'{k}: {v}\n' for k, v in kv)))


@FUZZ
@given(text=yaml_texts, as_bytes=st.binary(max_size=8))
def test_load_config_raises_only_config_errors(text, as_bytes, scratch):
    path = os.path.join(scratch, 'fuzz.yaml')
    with open(path, 'wb') as f:
        f.write(text.encode('utf-8', errors='surrogatepass') + as_bytes)
    try:
        config = utils.load_config(path)
    except utils.ConfigError as e:
        assert path in str(e)
        return
    assert isinstance(config, dict)
