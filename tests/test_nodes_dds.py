"""T2: the policy node (rclpy, Fast DDS) driven from a Cyclone DDS Python harness, inside a
private network namespace with only loopback (`unshare -rn`), so discovery cannot leave it."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ros_harness import ros_available

HERE = Path(__file__).parent
CYCLONE_CONFIG = ('<CycloneDDS><Domain id="any"><General><Interfaces>'
                  '<NetworkInterface name="lo" multicast="true"/>'
                  '</Interfaces></General></Domain></CycloneDDS>')
NAMESPACE_SETUP = 'ip link set lo up && ip link set lo multicast on && ' \
                  'ip route add 224.0.0.0/4 dev lo'


def namespace_unavailable():
    if shutil.which('unshare') is None or shutil.which('ip') is None:
        return 'unshare or ip (iproute2) not installed'
    probe = subprocess.run(['unshare', '-rn', 'sh', '-c', NAMESPACE_SETUP],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode:
        return f'network namespaces not permitted here: {probe.stderr.strip()[:200]}'
    return None


def cyclonedds_missing():
    try:
        import cyclonedds.domain  # noqa: F401
    except Exception as exc:
        return f'cyclonedds not importable: {exc}'
    return None


def test_policy_node_driven_from_cyclonedds(tmp_path):
    reason = ros_available() or cyclonedds_missing() or namespace_unavailable()
    if reason:
        pytest.skip(reason)
    config = tmp_path / 'cyclonedds.xml'
    config.write_text(CYCLONE_CONFIG)
    env = dict(os.environ, CYCLONEDDS_URI=config.as_uri())
    cmd = ['unshare', '-rn', 'sh', '-c', f'{NAMESPACE_SETUP} && exec "$0" "$1"',
           sys.executable, str(HERE / 'ros_harness_dds.py')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                         cwd=HERE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    actions = np.array(result['actions'])
    assert len(actions) >= 3, result['log']
    assert actions.shape[1] == 7 and np.all(np.abs(actions[:, :3]) <= 0.05)
    assert np.all((actions[:, 6] >= 0) & (actions[:, 6] <= 1))
    assert result['policy_alive']
