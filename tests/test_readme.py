"""README.md stays true: its first block is the two set-up commands, its Python snippet calls what the API has, and
every toy-world command it shows runs (on a mini world with tiny random checkpoints in a sandbox that mirrors the
repository, so that the README's relative paths resolve there and nothing is written into the checkout).
"""
import ast
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import engine
import models
import utils
from models.inference import InferenceModel
from tests.toy import MINI_WORLD_SIZES, ROOT, generate_world

README = os.path.join(ROOT, 'README.md')
TOY_MARKERS = ('configs/toy', 'data/toyworld', 'output/toy_demo')


def code_blocks(language=None):
    """The fenced code blocks of README.md (those of `language` when given), as strings."""
    text = open(README, encoding='utf-8').read()
    blocks = re.findall(r'^```([a-z]*)\n(.*?)^```', text, flags=re.S | re.M)
    return [body for lang, body in blocks if language is None or lang == language]


def toy_commands():
    """Shell lines of README.md that run a script on the toy world."""
    lines = []
    for body in code_blocks(''):
        for line in body.replace('\\\n', ' ').splitlines():
            if line.startswith('python ') and any(m in line for m in TOY_MARKERS):
                lines.append(line)
    return lines


def test_readme_starts_with_the_two_setup_commands_and_stays_short():
    first = code_blocks()[0].splitlines()
    assert [line.split()[:2] for line in first] == [['make', 'demo'], ['make', 'test']]
    assert os.path.getsize(README) <= 15_500


def test_python_snippet_uses_only_what_the_api_has():
    snippets = code_blocks('python')
    assert snippets, 'README has no Python snippet'
    tree = ast.parse(snippets[0])
    imports = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert ('models', 'load_model') in imports and callable(models.load_model)
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == 'model'}
    assert called and all(hasattr(InferenceModel, name) for name in called), called


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
    """A folder that looks like the checkout after `make demo`: the repository's files linked in, a mini toy world
    at data/toyworld and tiny random checkpoints where the demo leaves its own."""
    box = tmp_path_factory.mktemp('readme')
    for name in os.listdir(ROOT):
        if name not in ('data', 'output', '.venv', '.git') and not name.startswith('.pytest'):
            os.symlink(os.path.join(ROOT, name), box / name)
    world = generate_world(str(box / 'data' / 'toyworld'), 4, **MINI_WORLD_SIZES)
    # The README's example image names come from the default world; the mini world gets copies under those names.
    import shutil
    first = sorted(os.listdir(os.path.join(world, 'images')))[0]
    for line in toy_commands():
        for name in re.findall(r'data/toyworld/images/(\S+\.jpg)', line):
            if not os.path.exists(os.path.join(world, 'images', name)):
                shutil.copy(os.path.join(world, 'images', first), os.path.join(world, 'images', name))
    # Random models of the toy configs' sizes, saved as training saves them (with the config, relative paths).
    for task, name, path in (('pretrain', 'Pretrain', 'output/toy_demo/pretrain/checkpoint_last.pth'),
                             ('grounding', 'Grounding', 'output/toy_demo/grounding/checkpoint_best.pth')):
        config = utils.load_config(os.path.join(ROOT, 'configs', 'toy', f'{name}.yaml'))
        torch.manual_seed(0)
        cwd = os.getcwd()
        os.chdir(box)
        try:
            model = models.create_model(task, config, engine.build_tokenizer(config))
        finally:
            os.chdir(cwd)
        os.makedirs(os.path.dirname(box / path), exist_ok=True)
        torch.save({'model': model.state_dict(), 'config': config}, box / path)
    return str(box)


@pytest.mark.parametrize('index', range(len(toy_commands())))
def test_readme_toy_command_runs(sandbox, index):
    line = toy_commands()[index]
    argv = shlex.split(os.path.expanduser(line))
    argv[0] = sys.executable
    out = subprocess.run(argv, cwd=sandbox, capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'ALBEF_CACHE': os.path.join(sandbox, 'cache')})
    assert out.returncode == 0, f'{line}\n{out.stderr[-2000:]}'
