"""T1: the spacemouse node as a process (real rclpy), its device a named pipe standing in for
/dev/hidraw: bounded teleop/action while the device feeds it, the gripper taken from the arm and
toggled by a button, and no more actions (the node still up) once the device is gone.

Bounded: every wait has a timeout. A pipe, unlike hidraw, would join two reports written
back to back into one read, so each report is written only once the node has read the last.
"""

import array
import fcntl
import os
import struct
import termios

import numpy as np
import pytest
from ros_harness import Driver, ros_available

from robot_rl.types import ActionSpace

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

RATE_HZ = 20.0


class Operator(Driver):
    """A named pipe as the device, the spacemouse node reading it, and an rclpy test node."""

    def __init__(self, tmp):
        super().__init__(tmp, 't1_spacemouse')
        from std_msgs.msg import Float32MultiArray

        from robot_rl.nodes.ros_common import COMMAND_QOS
        self.device = tmp / 'hidraw_fifo'
        os.mkfifo(self.device)
        # Read-write: the open never waits for a reader, and the pipe has a writer (this test)
        # until close_device(), so the node's reads see no end of file before then.
        self.fd = os.open(self.device, os.O_RDWR | os.O_NONBLOCK)
        self.actions = []
        self.node.create_subscription(
            Float32MultiArray, 'teleop/action',
            lambda m: self.actions.append(np.array(m.data, np.float32)), COMMAND_QOS)
        self.pub_sent = self.node.create_publisher(Float32MultiArray, 'action_sent',
                                                   COMMAND_QOS)

    def unread(self) -> int:
        buf = array.array('i', [0])
        fcntl.ioctl(self.fd, termios.FIONREAD, buf)
        return buf[0]

    def write(self, report: bytes) -> None:
        """One report, once the node has read everything before it."""
        self.wait(lambda: self.unread() == 0, 10, 'the node to read the last report')
        os.write(self.fd, report)
        self.wait(lambda: self.unread() == 0, 10, 'the node to read the report')

    def close_device(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self):
        self.close_device()
        super().close()


@pytest.fixture
def operator(tmp_path):
    op = Operator(tmp_path)
    yield op
    op.close()


def test_spacemouse_node_publishes_bounded_teleop_until_the_device_is_gone(operator):
    from std_msgs.msg import Float32MultiArray

    from robot_rl.nodes import conversions as conv
    node = operator.start('spacemouse', 'spacemouse', {
        'device_path': str(operator.device), 'control_rate_hz': RATE_HZ, 'deadzone': 0.0,
        'translation_scale': 0.5})
    operator.wait(lambda: len(operator.actions) >= 3, 30, 'teleop actions at rest')
    np.testing.assert_allclose(operator.actions[-1], [0, 0, 0, 0, 0, 0, 1])

    # The arm closed its gripper under the policy: the device adopts it (nobody took over).
    operator.wait(lambda: operator.pub_sent.get_subscription_count() >= 1, 10,
                  'action_sent matched')
    operator.pub_sent.publish(conv.floats_to_multiarray(Float32MultiArray, [0.0] * 7))
    operator.wait(lambda: operator.actions[-1][6] == 0.0, 10, 'the gripper taken from the arm')

    # Cap pushed away from the person at full scale and to the right at half scale.
    operator.write(struct.pack('<Bhhh', 1, 175, -350, 0))
    operator.wait(lambda: operator.actions[-1][0] > 0, 10, 'a forward teleop action')
    np.testing.assert_allclose(operator.actions[-1], [0.025, -0.0125, 0, 0, 0, 0, 0.0],
                               rtol=1e-6)

    # A malformed report is dropped and logged; the node keeps going.
    operator.write(bytes([9, 1, 2]))
    operator.write(struct.pack('<BH', 3, 1))          # button 0 pressed: gripper opens
    operator.wait(lambda: operator.actions[-1][6] == 1.0, 10, 'the gripper toggled open')
    operator.write(struct.pack('<Bhhhhhh', 1, 0, 0, 0, 0, 0, -350))   # 13-byte report: yaw
    operator.wait(lambda: operator.actions[-1][5] > 0, 10, 'a yaw teleop action')
    np.testing.assert_allclose(operator.actions[-1], [0, 0, 0, 0, 0, 0.1, 1.0], rtol=1e-6)

    space = ActionSpace.bridge()
    for action in operator.actions:
        assert action.shape == (7,) and np.all(action >= space.low) and np.all(
            action <= space.high)

    operator.close_device()
    operator.wait(lambda: 'is gone (end of file)' in node.log(), 10, 'the device gone')
    operator.spin_for(0.5)        # actions published before the node saw it may still arrive
    count = len(operator.actions)
    operator.spin_for(1.0)        # 20 control periods
    assert len(operator.actions) == count, 'teleop/action went on after the device was gone'
    assert node.alive(), node.log()
    log = node.log()
    assert 'report dropped: SpaceMouse report id 9 (3 bytes: 09 01 02) is unknown' in log
    assert 'teleop/action stopped' in log
