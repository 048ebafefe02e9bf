"""T0: launch files and ROS parameter files are consistent with the nodes (no launch wheels
exist, so the files are checked by structure: `ros2 launch` itself is T3)."""

import ast
from importlib.metadata import distribution

from conftest import PROJECT_ROOT
import pytest
import yaml

from robot_rl.nodes.params import declared_names, NODE_PARAMS

LAUNCH_FILES = sorted((PROJECT_ROOT / 'launch').glob('*.launch.py'))
PARAM_FILES = sorted((PROJECT_ROOT / 'configs' / 'ros').glob('*.yaml'))


def console_scripts():
    return {ep.name for ep in distribution('robot_rl').entry_points
            if ep.group == 'console_scripts'}


def node_calls(tree):
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, 'id', None) == 'Node':
            yield {k.arg: k.value for k in call.keywords}


def flatten(d, prefix=''):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}'


def test_the_three_launch_files_exist():
    assert {p.name for p in LAUNCH_FILES} == {'sim.launch.py', 'widowx.launch.py',
                                              'learner.launch.py'}


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_structure(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(f, ast.FunctionDef) and f.name == 'generate_launch_description'
               for f in tree.body)
    scripts = console_scripts()
    calls = list(node_calls(tree))
    assert calls
    for kw in calls:
        assert kw['package'].value == 'robot_rl'
        executable = kw['executable'].value
        assert executable in scripts, f'{executable} is not a console script'
        files = [c.args[0].value for c in ast.walk(kw['parameters'])
                 if isinstance(c, ast.Call) and getattr(c.func, 'id', None) == 'params']
        assert files == [f'{executable}.yaml'], files
        assert (PROJECT_ROOT / 'configs' / 'ros' / files[0]).is_file()
        overrides = [d for d in ast.walk(kw['parameters']) if isinstance(d, ast.Dict)]
        for d in overrides:
            for key in d.keys:
                assert key.value in declared_names(executable), key.value


@pytest.mark.parametrize('path', PARAM_FILES, ids=lambda p: p.name)
def test_parameter_file_keys_are_declared(path):
    node = path.stem
    content = yaml.safe_load(path.read_text())
    assert list(content) == [node]
    keys = list(flatten(content[node]['ros__parameters']))
    undeclared = set(keys) - set(declared_names(node))
    assert not undeclared, f'{path.name}: not declared by {node}: {undeclared}'
    defaults = {p.name: p.default for p in NODE_PARAMS[node]}
    for key, value in zip(keys, _values(content[node]['ros__parameters'])):
        assert type(value) is type(defaults[key]), f'{key}: {value!r} vs {defaults[key]!r}'


def _values(d):
    for value in d.values():
        if isinstance(value, dict):
            yield from _values(value)
        else:
            yield value


def test_every_parameter_has_a_description():
    for node, specs in NODE_PARAMS.items():
        assert specs and all(p.description for p in specs), node
        assert node in console_scripts()
