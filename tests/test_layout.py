"""The layout's rules, checked on the source: data flows one way, no script imports another, modules stay small.

Layers, lowest first: utils <- dataset, models, optim, scheduler, vqaTools, refTools <- evaluation <- engine <-
task scripts (and benchmarks/, tools/, tests/, which nothing imports from the packages). A module may import its
own layer or a lower one, at top level or inside a function.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {'utils': 0, 'dataset': 1, 'models': 1, 'optim': 1, 'scheduler': 1, 'vqaTools': 1, 'refTools': 1,
          'evaluation': 2, 'engine': 3}
SCRIPTS = {'Pretrain', 'Pretrain_nlvr', 'Retrieval', 'VQA', 'NLVR', 'VE', 'Grounding', 'Predict', 'demo'}
OUTSIDE = {'benchmarks', 'tools', 'tests'}
MAX_LINES = 500
# Modules over MAX_LINES that hold one concept each, which splitting would scatter.
ONE_CONCEPT = {
    'models/checkpoint.py': 'checkpoint loading: reading, kind detection and the table of remap rules per pair',
    'models/xbert.py': 'the BERT with fusion layers, laid out like the original so released weights load by name',
}


def _modules(top: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        for name in sorted(files):
            if name.endswith('.py'):
                yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def _imported_roots(path: str):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split('.')[0]


def _package_modules():
    return [(top, path) for top in LAYERS for path in _modules(top)]


def test_imports_flow_downwards():
    wrong = []
    for top, path in _package_modules():
        for line, root in _imported_roots(path):
            if root in SCRIPTS or root in OUTSIDE or (root in LAYERS and LAYERS[root] > LAYERS[top]):
                wrong.append(f'{path}:{line} imports {root}')
    assert not wrong, wrong


def test_no_script_imports_another():
    wrong = []
    for script in sorted(SCRIPTS):
        path = f'{script}.py'
        for line, root in _imported_roots(path):
            if root in SCRIPTS and root != script:
                wrong.append(f'{path}:{line} imports {root}')
    assert not wrong, wrong


def test_modules_stay_small():
    tops = list(LAYERS) + sorted(OUTSIDE - {'tests'})
    sizes = {}
    for top in tops:
        for path in _modules(top):
            with open(os.path.join(ROOT, path)) as f:
                sizes[path] = sum(1 for _ in f)
    sizes.update({f'{s}.py': sum(1 for _ in open(os.path.join(ROOT, f'{s}.py'))) for s in SCRIPTS})
    too_long = {p: n for p, n in sizes.items() if n > MAX_LINES and p not in ONE_CONCEPT}
    assert not too_long, too_long
    stale = [p for p in ONE_CONCEPT if sizes.get(p, 0) <= MAX_LINES]
    assert not stale, f'no longer over {MAX_LINES} lines, drop from ONE_CONCEPT: {stale}'


@pytest.mark.parametrize('bad_import, expected', [('import engine', 'imports engine'),
                                                  ('from Retrieval import make_step_fn', 'imports Retrieval')])
def test_the_import_check_catches_an_upward_import(tmp_path, monkeypatch, bad_import, expected):
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / 'bad.py').write_text(f'def f():\n    {bad_import}\n')
    with pytest.raises(AssertionError, match=expected):
        test_imports_flow_downwards()


PROJECT = set(LAYERS) | SCRIPTS | OUTSIDE


def test_every_project_import_resolves():
    """Imports inside functions run only when called: a moved or renamed name must not hide there."""
    import importlib
    missing = []
    for top in sorted(set(LAYERS) | OUTSIDE):
        paths = list(_modules(top))
        for path in paths + ([f'{s}.py' for s in sorted(SCRIPTS)] if top == 'utils' else []):
            with open(os.path.join(ROOT, path)) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split('.')[0] in PROJECT):
                    continue
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    missing.append(f'{path}:{node.lineno} {node.module}: {e}')
                    continue
                for alias in node.names:
                    if alias.name != '*' and not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f'{node.module}.{alias.name}')
                        except ImportError:
                            missing.append(f'{path}:{node.lineno} {node.module} has no {alias.name}')
    assert not missing, missing
