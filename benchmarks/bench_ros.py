"""ROS 2 benchmarks on loopback: camera-to-action latency (policy node, steering K = 10, CPU),
delivery of a ~25M-parameter weight update to the policy node, learner ingest rate.

    MUJOCO_GL=egl USE_TF=0 .venv-test/bin/python benchmarks/bench_ros.py [--frames 100]

Needs the test environment (ros-jazzy wheels); the rclpy driver lives in
tests/ros_harness_bench.py because rclpy is imported only in robot_rl/nodes/ and tests/.
"""

from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from ros_harness_bench import main  # noqa: E402

if __name__ == '__main__':
    main()
