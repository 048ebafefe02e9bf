"""Helpers for the T1/T2 tests: loopback-only ROS environment, node processes, waiting.

Each test session uses its own ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, so
nothing leaves the machine and parallel runs do not see each other.
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

import yaml

BIN = Path(sys.executable).parent


def ros_available() -> Optional[str]:
    """None when rclpy and the message packages import, else the reason."""
    try:
        import rclpy  # noqa: F401
        from sensor_msgs.msg import Image  # noqa: F401
        from std_msgs.msg import String  # noqa: F401
    except Exception as exc:  # ImportError, or the C extension failing to load
        return f'rclpy / ROS message packages not importable: {exc}'
    return None


def loopback_env(domain_id: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({'ROS_DOMAIN_ID': str(domain_id), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                'PYTHONUNBUFFERED': '1', 'MUJOCO_GL':
                env.get('MUJOCO_GL', 'egl'), 'USE_TF': '0', 'HF_HUB_OFFLINE': '1',
                'TF_CPP_MIN_LOG_LEVEL': '2', 'OMP_NUM_THREADS': '1'})
    env.pop('ROS_STATIC_PEERS', None)
    return env


def unique_domain_id() -> int:
    return 1 + (os.getpid() * 7 + int(time.time())) % 100


def node_command(executable: str):
    """The node's console script, as `ros2 run robot_rl <executable>` would start it."""
    script = BIN / executable
    if not script.is_file():
        raise FileNotFoundError(f'console script {script} is missing: reinstall the package '
                                '(pip install --no-deps -e .)')
    return [str(script)]


class NodeProcess:
    """A node executable run as `<exe> --ros-args --params-file <yaml>` with its log file."""

    def __init__(self, executable: str, params: Dict[str, Any], workdir: Path,
                 env: Dict[str, str], name: Optional[str] = None, prefix=()):
        self.name = name or executable
        self.log_path = workdir / f'{self.name}.log'
        params_path = workdir / f'{self.name}.params.yaml'
        params_path.write_text(yaml.safe_dump({'/**': {'ros__parameters': params}}))
        cmd = list(prefix) + node_command(executable) + ['--ros-args', '--params-file',
                                                         str(params_path)]
        self._log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=workdir, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    def stop(self, sig=signal.SIGINT, timeout: float = 15.0) -> int:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def spin_until(executor, predicate: Callable[[], bool], timeout: float,
               what: str = 'condition', procs=()) -> None:
    """Spin `executor` until predicate() holds; AssertionError (with node logs) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
        if predicate():
            return
        for p in procs:
            if not p.alive():
                raise AssertionError(f'{p.name} exited while waiting for {what}:\n{p.log()}')
    logs = '\n'.join(f'--- {p.name}\n{p.log()[-3000:]}' for p in procs)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}\n{logs}')


class Driver:
    """An rclpy test node in its own context and ROS domain, plus the node processes it
    started (by name); `close` stops them all."""

    def __init__(self, tmp: Path, node_name: str = 't1_driver'):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        self.tmp = tmp
        self.domain = unique_domain_id()
        self.env = loopback_env(self.domain)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain)
        self.node = rclpy.create_node(node_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.procs: Dict[str, NodeProcess] = {}

    def start(self, name: str, executable: str, params: Dict[str, Any]) -> NodeProcess:
        self.procs[name] = NodeProcess(executable, params, self.tmp, self.env, name=name)
        return self.procs[name]

    def wait(self, predicate, timeout, what):
        spin_until(self.executor, predicate, timeout, what, list(self.procs.values()))

    def spin_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.02)

    def close(self):
        for p in self.procs.values():
            p.stop()
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()
