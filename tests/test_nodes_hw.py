"""T1: the hardware-side nodes (camera, widowx) as processes, driven from an rclpy test node.

The camera node reads a video file through the same OpenCV capture a USB camera uses; the widowx
node drives a ros2_control joint trajectory controller (trajectory_msgs, the interface used when
interbotix_xs_msgs is not installed) from joint states this test publishes. Bounded: every wait
has a timeout.
"""

import numpy as np
import pytest
from ros_harness import ros_available

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

RED_BGR = (0, 0, 255)
ROBOT = 'wx250s'
WORKSPACE_LOW = [0.12, -0.25, 0.015, -0.8, -0.8, -2.0]
WORKSPACE_HIGH = [0.45, 0.25, 0.25, 0.8, 0.8, 2.0]
MAX_JOINT_STEP = 0.2
RATE_HZ = 10.0


VIDEO_FRAMES = 200
"""10 s at 20 Hz: time for discovery on a loaded machine before the file ends."""


def write_video(path, frames=VIDEO_FRAMES, size=(160, 120)):
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10.0, size)
    assert writer.isOpened(), 'OpenCV cannot write MJPG video here'
    frame = np.zeros((size[1], size[0], 3), np.uint8)
    frame[:] = RED_BGR
    for _ in range(frames):
        writer.write(frame)
    writer.release()


def test_camera_node_publishes_rgb_and_jpeg_frames_and_survives_the_end_of_input(ros_driver):
    driver = ros_driver
    import cv2
    from sensor_msgs.msg import CompressedImage, Image

    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.ros_common import SENSOR_QOS
    video = driver.tmp / 'red.avi'
    write_video(video)
    raw, compressed = [], []
    driver.node.create_subscription(Image, 'camera/image_raw', raw.append, SENSOR_QOS)
    driver.node.create_subscription(CompressedImage, 'camera/image_raw/compressed',
                                    compressed.append, SENSOR_QOS)
    camera = driver.start('camera', 'camera', {
        'device': str(video), 'width': 160, 'height': 120, 'output_size': 64, 'rate_hz': 20.0})
    driver.wait(lambda: raw and compressed, 60, 'camera frames')

    rgb = conv.image_to_rgb(raw[0])
    assert raw[0].encoding == 'rgb8' and rgb.shape == (64, 64, 3)
    # BGR red in the file is RGB red on the topic: channel order converted once, not twice.
    mean = rgb.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 200 and mean[1] < 40 and mean[2] < 40, mean
    decoded = cv2.imdecode(np.frombuffer(bytes(compressed[0].data), np.uint8), cv2.IMREAD_COLOR)
    assert compressed[0].format.startswith('rgb8; jpeg')
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded.reshape(-1, 3).mean(axis=0) - RED_BGR).max() < 40

    # When the file ends, reads fail, are logged, and the node keeps running instead of
    # crashing the camera pipeline.
    driver.wait(lambda: 'camera read failed' in camera.log(), 60, 'the end of the video')
    assert camera.alive()
    assert len(raw) <= VIDEO_FRAMES


def test_camera_node_names_a_device_it_cannot_open(ros_driver):
    driver = ros_driver
    camera = driver.start('camera_bad', 'camera', {'device': str(driver.tmp / 'missing.avi')})
    camera.proc.wait(60)
    assert camera.proc.returncode != 0
    assert 'cannot open camera' in camera.log() and 'missing.avi' in camera.log()


def joint_limits():
    from robot_rl.nodes.arm_safety import ArmCommander
    ik = ArmCommander(WORKSPACE_LOW, WORKSPACE_HIGH).ik
    return ik.lower, ik.upper


class WidowXRig:
    """The widowx node as a process against a joint trajectory controller's topics: the test
    plays the controller's side (joint states) and records every command and applied action.
    With `follow`, every command is answered by joint states at its positions (an arm that
    tracks perfectly)."""

    def __init__(self, driver, **params):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool, Float32MultiArray
        from std_srvs.srv import Trigger
        from trajectory_msgs.msg import JointTrajectory

        from robot_rl.nodes.arm_safety import ARM_JOINTS
        from robot_rl.nodes.ros_common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
        self.driver, self.names = driver, list(ARM_JOINTS) + ['gripper']
        self.trajectories, self.sent, self.follow = [], [], False
        self.estops = {'engaged': 0, 'released': 0}  # e-stop log lines seen so far
        n = driver.node
        n.create_subscription(JointTrajectory, '/arm_controller/joint_trajectory',
                              self._on_trajectory, 10)
        n.create_subscription(Float32MultiArray, 'action_sent',
                              lambda m: self.sent.append(np.array(m.data)), COMMAND_QOS)
        self.pub_action = n.create_publisher(Float32MultiArray, 'action', COMMAND_QOS)
        self.pub_joints = n.create_publisher(JointState, f'/{ROBOT}/joint_states', SENSOR_QOS)
        self.pub_estop = n.create_publisher(Bool, 'estop', LATCHED_QOS)
        self.home_client = n.create_client(Trigger, 'home')
        self.proc = driver.start('widowx', 'widowx', {
            'robot_model': ROBOT, 'command_interface': 'trajectory', 'control_rate_hz': RATE_HZ,
            'max_joint_step': MAX_JOINT_STEP, 'workspace_low': WORKSPACE_LOW,
            'workspace_high': WORKSPACE_HIGH, **params})
        driver.wait(lambda: self.pub_action.get_subscription_count() > 0
                    and self.pub_joints.get_subscription_count() > 0
                    and self.home_client.service_is_ready(), 60, 'widowx start')
        driver.spin_for(0.5)  # let discovery settle for the best-effort joint states

    def _on_trajectory(self, msg):
        self.trajectories.append(msg)
        if self.follow:
            self.joints(msg.points[0].positions)

    def joints(self, arm, times=1):
        from sensor_msgs.msg import JointState
        for _ in range(times):
            self.pub_joints.publish(JointState(name=self.names,
                                               position=[float(q) for q in arm] + [0.0]))
            if times > 1:
                self.driver.spin_for(0.05)

    def act(self, action, steps, period=1.0 / RATE_HZ):
        from std_msgs.msg import Float32MultiArray

        from robot_rl.nodes import conversions as conv
        for _ in range(steps):
            self.pub_action.publish(conv.floats_to_multiarray(Float32MultiArray,
                                                              np.asarray(action, np.float32)))
            self.driver.spin_for(period)

    def estop(self, engaged):
        from std_msgs.msg import Bool
        self.pub_estop.publish(Bool(data=engaged))
        word = 'engaged' if engaged else 'released'
        self.driver.wait(lambda: self.proc.log().count(f'e-stop {word}') > self.estops[word],
                         30, f'e-stop {word}')
        self.estops[word] += 1

    def home_async(self):
        from std_srvs.srv import Trigger
        return self.home_client.call_async(Trigger.Request())

    def home(self, timeout=30):
        future = self.home_async()
        self.driver.wait(future.done, timeout, 'the home service to answer')
        return future.result()

    def positions(self, since=0):
        """Commanded arm joints (N, 6) from command `since` on, each checked for the joint
        names and a single point."""
        from robot_rl.nodes.arm_safety import ARM_JOINTS
        out = []
        for msg in self.trajectories[since:]:
            assert list(msg.joint_names) == list(ARM_JOINTS) and len(msg.points) == 1
            out.append(np.array(msg.points[0].positions))
        return np.array(out)


def assert_safe(positions, previous):
    """Every command inside the joint limits and within MAX_JOINT_STEP of the one before
    (`previous`: the joints before the first)."""
    lower, upper = joint_limits()
    assert np.all(positions >= lower - 1e-9) and np.all(positions <= upper + 1e-9), positions
    steps = np.abs(np.diff(np.vstack([previous, positions]), axis=0))
    assert steps.max() <= MAX_JOINT_STEP + 1e-6, steps.max()


@pytest.fixture
def widowx_rig(ros_driver):
    return lambda **params: WidowXRig(ros_driver, **params)


def test_widowx_node_sends_clamped_trajectories_holds_on_silence_and_on_estop(widowx_rig):
    from robot_rl.nodes.arm_safety import HOME_JOINTS
    from robot_rl.types import ActionSpace
    rig = widowx_rig()
    rig.joints(HOME_JOINTS, times=5)

    # Far outside the action bounds, pushing up and out: every command stays in bounds.
    rig.act([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 3.0], 20)
    rig.driver.wait(lambda: len(rig.trajectories) >= 8, 30, 'joint trajectories')
    positions = rig.positions()
    assert_safe(positions[1:], positions[0])
    space = ActionSpace.bridge()
    assert len(rig.sent) >= 8
    for applied in rig.sent:
        np.testing.assert_allclose(applied, space.clip(applied))
    np.testing.assert_allclose(rig.sent[0], space.high, atol=1e-6)  # clipped, not rejected

    # Bad actions are dropped with a reason; the node keeps running.
    from std_msgs.msg import Float32MultiArray
    rig.pub_action.publish(Float32MultiArray(data=[0.01] * 5))
    rig.pub_action.publish(Float32MultiArray(data=[float('nan')] + [0.0] * 6))
    rig.driver.wait(lambda: rig.proc.log().count('action dropped') >= 2, 30,
                    'bad actions logged')
    assert 'shape' in rig.proc.log() and 'non-finite' in rig.proc.log()
    assert rig.proc.alive()

    # Silence: the watchdog holds (nothing new is sent) within two control periods.
    rig.driver.spin_for(3 / RATE_HZ)
    count = len(rig.trajectories)
    rig.driver.spin_for(1.0)
    assert len(rig.trajectories) == count

    # E-stop engaged: fresh actions are not executed until it is released.
    rig.estop(True)
    rig.act([0.01, 0, 0, 0, 0, 0, 1.0], 8)
    assert len(rig.trajectories) == count
    rig.estop(False)
    rig.act([0.01, 0, 0, 0, 0, 0, 1.0], 8)
    rig.driver.wait(lambda: len(rig.trajectories) > count, 30, 'commands after the release')


AWAY = np.array([0.6, -0.5, 0.6, 0.5, 0.4, -0.5])
"""A pose well away from home (every joint off by 0.46-0.7 rad), inside the joint limits."""
HOME_TIMEOUT_S = 2.0


def test_widowx_home_service_moves_home_safely_and_fails_with_a_reason(widowx_rig):
    from robot_rl.nodes.arm_safety import HOME_JOINTS
    rig = widowx_rig(home_timeout_s=HOME_TIMEOUT_S, home_tolerance_rad=0.05)
    rig.joints(AWAY, times=5)

    # An arm that follows its commands: home is reached in clamped steps, then success.
    rig.follow = True
    response = rig.home()
    assert response.success, response.message
    assert response.message.startswith('home reached')
    positions = rig.positions()
    assert len(positions) >= np.ceil(np.abs(AWAY - HOME_JOINTS).max() / MAX_JOINT_STEP)
    assert_safe(positions, AWAY)
    np.testing.assert_allclose(positions[-1], HOME_JOINTS, atol=0.05)
    assert rig.sent == []  # homing is no episode step: nothing on action_sent

    # Under the e-stop: refused with the reason, nothing sent.
    count = len(rig.trajectories)
    rig.estop(True)
    response = rig.home()
    assert not response.success and 'e-stop engaged' in response.message
    assert len(rig.trajectories) == count
    rig.estop(False)

    # An arm that does not follow (stuck away from home): failure at the timeout, with the
    # joint error; every command on the way still inside the limits and the per-step change.
    rig.follow = False
    rig.joints(AWAY, times=5)
    count = len(rig.trajectories)
    response = rig.home(timeout=HOME_TIMEOUT_S + 20)
    assert not response.success
    assert f'home not reached within {HOME_TIMEOUT_S:g} s: largest joint error' in (
        response.message)
    assert len(rig.trajectories) > count
    assert_safe(rig.positions(count), AWAY)

    # The e-stop engaged while homing runs: it stops at once and answers why.
    count = len(rig.trajectories)
    future = rig.home_async()
    rig.driver.wait(lambda: len(rig.trajectories) > count, 20, 'homing to start')
    rig.estop(True)
    rig.driver.wait(future.done, 20, 'the home service to answer')
    assert not future.result().success
    assert 'e-stop engaged during homing' in future.result().message
    count = len(rig.trajectories)
    rig.driver.spin_for(3 / RATE_HZ)
    assert len(rig.trajectories) == count  # holds: nothing more is sent
