"""Security properties of the code base, checked on its source (AST) and on its behaviour.

* Every torch.load / torch.hub.load_state_dict_from_url call passes weights_only: True, or `not allow_pickle` in
  the one loader that has the documented opt-out (--unsafe_load); no plain pickle.load / numpy pickles.
* YAML is read in safe mode only: a config with a Python object tag is refused and its payload never runs.
* No eval / exec / compile / __import__ anywhere: config values are data, never code.
* Image paths from annotation files cannot leave image_root (absolute paths or '..') unless the config allows it
  (`allow_absolute_paths: true`); the check lives in dataset.utils.resolve_image_path, where every dataset joins
  image_root with an annotation path, and names the file, the item index and the path.
"""
import ast
import json
import os

import pytest

import utils
from dataset import DataError, create_dataset
from tests.toy import ROOT

SKIPPED_DIRS = {'.venv', '.git', 'tests', 'data', 'output', '__pycache__', '.hypothesis', '.pytest_cache'}


def project_sources():
    """(relative path, AST) of every .py file of the project itself (not the venv, the tests or generated data)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith('.'))
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8') as f:
                    out.append((os.path.relpath(path, ROOT), ast.parse(f.read(), filename=path)))
    assert len(out) > 30  # the walk found the project
    return out


SOURCES = project_sources()


def dotted_name(node) -> str:
    """'torch.hub.load_state_dict_from_url' for the expression a call is made on ('' when not a plain name)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f'{base}.{node.attr}' if base else ''
    return ''


def calls(name_suffixes):
    """(file, line, call node) of every call whose dotted name ends with one of `name_suffixes`."""
    found = []
    for path, tree in SOURCES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = dotted_name(node.func)
                if any(name == s or name.endswith('.' + s) for s in name_suffixes):
                    found.append((path, node.lineno, node))
    return found


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_uses_weights_only():
    loads = calls(['torch.load', 'load_state_dict_from_url'])
    assert loads, 'expected at least the checkpoint loader'
    opt_outs = []
    for path, line, call in loads:
        value = keyword(call, 'weights_only')
        assert value is not None, f'{path}:{line}: torch load without weights_only'
        if isinstance(value, ast.Constant):
            assert value.value is True, f'{path}:{line}: weights_only={value.value!r}'
        else:  # the only other form allowed: the explicit opt-out `weights_only=not allow_pickle`
            assert (isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not)
                    and isinstance(value.operand, ast.Name) and value.operand.id == 'allow_pickle'), \
                f'{path}:{line}: weights_only={ast.unparse(value)}'
            opt_outs.append(path)
    assert set(opt_outs) == {os.path.join('models', 'checkpoint.py')}  # the one documented opt-out (--unsafe_load)


def test_no_unrestricted_unpickling():
    assert calls(['pickle.load', 'pickle.loads', 'dill.load', 'joblib.load']) == []
    for path, line, call in calls(['np.load', 'numpy.load']):
        value = keyword(call, 'allow_pickle')
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), f'{path}:{line}'
    # The one unpickler (RefCOCO's refs(*).p) must override find_class, i.e. refuse globals it does not know.
    unpicklers = [(path, node) for path, tree in SOURCES for node in ast.walk(tree)
                  if isinstance(node, ast.ClassDef) and any(dotted_name(b).endswith('Unpickler') for b in node.bases)]
    assert unpicklers
    for path, node in unpicklers:
        assert any(isinstance(f, ast.FunctionDef) and f.name == 'find_class' for f in node.body), path


def test_yaml_is_only_read_in_safe_mode():
    yamls = calls(['YAML'])
    assert yamls
    for path, line, call in yamls:
        typ = keyword(call, 'typ')
        assert isinstance(typ, ast.Constant) and typ.value == 'safe', f'{path}:{line}: YAML(typ=...) not safe'
    assert calls(['yaml.load', 'yaml.unsafe_load', 'yaml.full_load', 'yaml.load_all']) == []


def test_python_object_tag_is_refused_and_not_run(tmp_path):
    marker = tmp_path / 'pwned'
    config = tmp_path / 'evil.yaml'
    config.write_text(f'image_res: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(utils.ConfigError, match=r'evil\.yaml:1:\d+: cannot parse YAML: could not determine a '
                                                r'constructor .*python/object/apply:os\.system.* safe mode'):
        utils.load_config(str(config))
    assert not marker.exists()


def test_no_eval_or_exec_anywhere():
    offenders = [f'{path}:{node.lineno} {node.func.id}()' for path, tree in SOURCES for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                 and node.func.id in ('eval', 'exec', 'compile', '__import__')]
    assert offenders == []


def test_config_values_stay_data(tmp_path):
    """A config value that looks like code is kept as a string (and then refused for its type), never run."""
    config = tmp_path / 'c.yaml'
    config.write_text("image_res: \"__import__('os').system('true')\"\n")
    with pytest.raises(utils.ConfigError, match="key 'image_res' must be int, got str"):
        utils.load_config(str(config))


# ----------------------------------------------------------------------------------------------------------------
# Image paths
# ----------------------------------------------------------------------------------------------------------------
# One annotation file per dataset name whose item 1 carries `path` where an image path goes.
def _annotations(name: str, path: str) -> list:
    good = {'re': {'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
            'vqa': {'image': 'a.jpg', 'question': 'q', 'dataset': 'vqa', 'answer': ['yes'], 'question_id': 1},
            'nlvr': {'images': ['a.jpg', 'a.jpg'], 'sentence': 's', 'label': 'True'},
            've': {'image': 'a', 'sentence': 's', 'label': 'neutral'},
            'grounding': {'image': 'a.jpg', 'text': 't', 'ref_id': 1}}[name]
    bad = dict(good)
    if name == 'nlvr':
        bad['images'] = ['a.jpg', path]
    else:
        bad['image'] = path[:-len('.jpg')] if name == 've' else path  # VE ids get '.jpg' appended
    return [good, bad]


def _config(tmp_path, name: str, path: str, **extra) -> dict:
    ann = tmp_path / f'{name}.json'
    items = _annotations(name, path)
    ann.write_text(json.dumps(items))
    eval_ann = ann
    if name == 're':  # retrieval evaluation files hold a caption list per image
        eval_ann = tmp_path / 're_eval.json'
        eval_ann.write_text(json.dumps([{'image': it['image'], 'caption': [it['caption']]} for it in items]))
    answers = tmp_path / 'answers.json'
    answers.write_text('["yes"]')
    root = str(tmp_path / 'images')
    return {'image_res': 16, 'train_file': [str(ann)], 'val_file': str(eval_ann), 'test_file': str(eval_ann),
            'image_root': root, 'vqa_root': root, 'answer_list': str(answers), **extra}


ESCAPES = ['../../etc/passwd.jpg', '/etc/passwd.jpg', 'sub/../../../x.jpg']


@pytest.mark.parametrize('name', ['re', 'vqa', 'nlvr', 've', 'grounding'])
@pytest.mark.parametrize('path', ESCAPES)
def test_annotation_paths_cannot_escape_image_root(tmp_path, name, path):
    config = _config(tmp_path, name, path)
    with pytest.raises(DataError) as e:
        create_dataset(name, config)
    message = str(e.value)
    assert f'{name}.json item 1: image path {path!r} escapes image_root' in message
    assert 'allow_absolute_paths' in message and '\n' not in message


@pytest.mark.parametrize('name', ['re', 'vqa', 'nlvr', 've', 'grounding'])
def test_allow_absolute_paths_opens_the_escape_hatch(tmp_path, name):
    create_dataset(name, _config(tmp_path, name, '/etc/passwd.jpg', allow_absolute_paths=True))


def test_pretraining_paths_are_used_as_given(tmp_path):
    """Pretraining files list absolute paths (the toy world's spell out its folder): allowed by default there,
    refused when the config turns allow_absolute_paths off."""
    ann = tmp_path / 'pretrain.json'
    ann.write_text(json.dumps([{'image': str(tmp_path / 'a.jpg'), 'caption': 'x'}]))
    config = {'image_res': 16, 'train_file': [str(ann)]}
    assert len(create_dataset('pretrain', config)) == 1
    with pytest.raises(DataError, match=r'pretrain\.json item 0: image path .* escapes image_root'):
        create_dataset('pretrain', dict(config, allow_absolute_paths=False))
