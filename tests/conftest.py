"""Shared test set-up: offscreen rendering and quiet TensorFlow before anything imports them."""

import os
from pathlib import Path

import pytest

os.environ.setdefault('MUJOCO_GL', 'egl')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('USE_TF', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BRIDGE_DEBUG = PROJECT_ROOT.parent / 'shared' / 'data' / 'bridge_debug' / '1.0.0'


@pytest.fixture
def bridge_debug_dir():
    """The real Bridge sample shipped beside the project; tests using it skip when it is absent."""
    if not BRIDGE_DEBUG.is_dir():
        pytest.skip(f'real Bridge sample not found at {BRIDGE_DEBUG}')
    return BRIDGE_DEBUG


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: the models are tiny and threads only contend on a shared CPU."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ros_driver(tmp_path):
    """T1: an rclpy driver node in a fresh loopback ROS domain (tests/ros_harness.Driver); the
    node processes it started are stopped afterwards."""
    from ros_harness import Driver
    driver = Driver(tmp_path)
    yield driver
    driver.close()
