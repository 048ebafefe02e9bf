"""The package is a well-formed ament_python package whose console scripts all resolve."""

from importlib import import_module
from importlib.metadata import distribution
import shutil
import subprocess
import sys
from xml.etree import ElementTree

from conftest import PROJECT_ROOT
import pytest

ROS_DEPENDENCIES = {'rclpy', 'sensor_msgs', 'std_msgs', 'geometry_msgs', 'trajectory_msgs'}


def console_scripts():
    return [ep for ep in distribution('robot_rl').entry_points if ep.group == 'console_scripts']


def test_package_xml_is_format_3_with_ros_dependencies():
    root = ElementTree.parse(PROJECT_ROOT / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == 'robot_rl'
    assert root.findtext('export/build_type') == 'ament_python'
    assert ROS_DEPENDENCIES <= {d.text for d in root.iter('exec_depend')}


def test_ament_resource_marker_and_script_dirs():
    assert (PROJECT_ROOT / 'resource' / 'robot_rl').is_file()
    setup_cfg = (PROJECT_ROOT / 'setup.cfg').read_text()
    assert 'script_dir=$base/lib/robot_rl' in setup_cfg
    assert 'install_scripts=$base/lib/robot_rl' in setup_cfg


@pytest.mark.parametrize('entry_point', console_scripts(), ids=lambda ep: ep.name)
def test_console_script_resolves(entry_point):
    module, _, attr = entry_point.value.partition(':')
    assert callable(getattr(import_module(module), attr))


def test_no_ros_imports_outside_nodes():
    offenders = []
    for path in PROJECT_ROOT.glob('**/*.py'):
        rel = path.relative_to(PROJECT_ROOT)
        if rel.parts[0] in ('tests', '.venv', '.venv-test', 'build', 'install') or \
                rel.parts[:2] == ('robot_rl', 'nodes'):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(('import rclpy', 'from rclpy')) or (
                    stripped.startswith('from ') and '_msgs' in stripped.split()[1]):
                offenders.append(f'{rel}: {stripped}')
    assert not offenders, offenders


@pytest.mark.skipif(shutil.which('git') is None, reason='git is needed to copy the sources')
def test_install_puts_the_ament_layout_in_place(tmp_path):
    """A non-editable install (what colcon and pip do) ships the index marker, configs, assets."""
    source, prefix = tmp_path / 'src', tmp_path / 'prefix'
    subprocess.run(['git', 'clone', '-q', str(PROJECT_ROOT), str(source)], check=True, timeout=120)
    # --ignore-installed: leave the editable install of the running test venv alone.
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                    '--ignore-installed',
                    '--no-build-isolation', '--prefix', str(prefix), str(source)],
                   check=True, timeout=300, capture_output=True)
    share = prefix / 'share'
    assert (share / 'ament_index' / 'resource_index' / 'packages' / 'robot_rl').is_file()
    assert (share / 'robot_rl' / 'package.xml').is_file()
    assert (share / 'robot_rl' / 'configs' / 'demo.yaml').is_file()
    assert list(prefix.glob('lib/python3*/site-packages/robot_rl/envs/assets/widowx250.xml'))
