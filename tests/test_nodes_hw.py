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


def test_widowx_node_sends_clamped_trajectories_holds_on_silence_and_on_estop(ros_driver):
    driver = ros_driver
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Bool, Float32MultiArray
    from trajectory_msgs.msg import JointTrajectory

    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.arm_safety import ARM_JOINTS, HOME_JOINTS
    from robot_rl.nodes.ros_common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
    from robot_rl.types import ActionSpace
    trajectories, sent = [], []
    driver.node.create_subscription(JointTrajectory, '/arm_controller/joint_trajectory',
                                    trajectories.append, 10)
    driver.node.create_subscription(Float32MultiArray, 'action_sent',
                                    lambda m: sent.append(np.array(m.data)), COMMAND_QOS)
    pub_action = driver.node.create_publisher(Float32MultiArray, 'action', COMMAND_QOS)
    pub_joints = driver.node.create_publisher(JointState, f'/{ROBOT}/joint_states', SENSOR_QOS)
    pub_estop = driver.node.create_publisher(Bool, 'estop', LATCHED_QOS)
    widowx = driver.start('widowx', 'widowx', {
        'robot_model': ROBOT, 'command_interface': 'trajectory', 'control_rate_hz': RATE_HZ,
        'max_joint_step': MAX_JOINT_STEP, 'workspace_low': WORKSPACE_LOW,
        'workspace_high': WORKSPACE_HIGH})
    driver.wait(lambda: pub_action.get_subscription_count() > 0
                and pub_joints.get_subscription_count() > 0, 60, 'widowx start')
    names = list(ARM_JOINTS) + ['gripper']
    driver.spin_for(0.5)  # let discovery settle for the best-effort joint states
    for _ in range(5):
        pub_joints.publish(JointState(name=names, position=list(HOME_JOINTS) + [0.0]))
        driver.spin_for(0.05)

    def act(action, steps, period=1.0 / RATE_HZ):
        for _ in range(steps):
            pub_action.publish(conv.floats_to_multiarray(Float32MultiArray,
                                                         np.asarray(action, np.float32)))
            driver.spin_for(period)

    # Far outside the action bounds, pushing up and out: every command stays in bounds.
    act([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 3.0], 20)
    driver.wait(lambda: len(trajectories) >= 8, 30, 'joint trajectories')
    lower, upper = joint_limits()
    space = ActionSpace.bridge()
    positions = []
    for msg in trajectories:
        assert list(msg.joint_names) == list(ARM_JOINTS) and len(msg.points) == 1
        q = np.array(msg.points[0].positions)
        assert np.all(q >= lower - 1e-9) and np.all(q <= upper + 1e-9), q
        positions.append(q)
    steps = np.abs(np.diff(np.array(positions), axis=0))
    assert steps.max() <= MAX_JOINT_STEP + 1e-6
    assert len(sent) >= 8
    for applied in sent:
        np.testing.assert_allclose(applied, space.clip(applied))
    np.testing.assert_allclose(sent[0], space.high, atol=1e-6)  # clipped, not rejected

    # Bad actions are dropped with a reason; the node keeps running.
    count = len(trajectories)
    pub_action.publish(Float32MultiArray(data=[0.01] * 5))
    pub_action.publish(Float32MultiArray(data=[float('nan')] + [0.0] * 6))
    driver.wait(lambda: widowx.log().count('action dropped') >= 2, 30, 'bad actions logged')
    assert 'shape' in widowx.log() and 'non-finite' in widowx.log()
    assert widowx.alive()

    # Silence: the watchdog holds (nothing new is sent) within two control periods.
    driver.spin_for(3 / RATE_HZ)
    count = len(trajectories)
    driver.spin_for(1.0)
    assert len(trajectories) == count

    # E-stop engaged: fresh actions are not executed until it is released.
    pub_estop.publish(Bool(data=True))
    driver.wait(lambda: 'e-stop engaged' in widowx.log(), 30, 'e-stop engaged')
    act([0.01, 0, 0, 0, 0, 0, 1.0], 8)
    assert len(trajectories) == count
    pub_estop.publish(Bool(data=False))
    driver.wait(lambda: 'e-stop released' in widowx.log(), 30, 'e-stop released')
    act([0.01, 0, 0, 0, 0, 0, 1.0], 8)
    driver.wait(lambda: len(trajectories) > count, 30, 'commands after the release')
