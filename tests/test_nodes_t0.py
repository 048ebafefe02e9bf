"""T0 (no ROS): message conversions against the rosbags classes of Humble and Jazzy, the arm
safety logic and the policy node's selection seam."""

import numpy as np
import pytest
from rosbags.typesys import get_typestore, Stores

from robot_rl.nodes import conversions as conv
from robot_rl.nodes.arm_safety import ArmCommander, clamp_joint_step, Watchdog
from robot_rl.types import ActionSpace

STORES = {'humble': Stores.ROS2_HUMBLE, 'jazzy': Stores.ROS2_JAZZY}


@pytest.fixture(params=sorted(STORES))
def store(request):
    return get_typestore(STORES[request.param])


def header(store, ns=1_500_000_001, frame='camera'):
    time_type = store.types['builtin_interfaces/msg/Time']
    header_type = store.types['std_msgs/msg/Header']
    sec, nanosec = conv.ns_to_stamp_fields(ns)
    return header_type(stamp=time_type(sec=sec, nanosec=nanosec), frame_id=frame)


def cdr_round_trip(store, msg, typename):
    return store.deserialize_cdr(store.serialize_cdr(msg, typename), typename)


def test_image_round_trip_through_cdr(store):
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    msg = conv.rgb_to_image(store.types['sensor_msgs/msg/Image'], header(store), rgb,
                            as_numpy=True)
    back = cdr_round_trip(store, msg, 'sensor_msgs/msg/Image')
    np.testing.assert_array_equal(conv.image_to_rgb(back), rgb)
    assert conv.stamp_to_ns(back.header.stamp) == 1_500_000_001


def test_bgr_mono_and_padded_rows(store):
    image_type = store.types['sensor_msgs/msg/Image']
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    bgr = image_type(header=header(store), height=2, width=3, encoding='bgr8', is_bigendian=0,
                     step=12, data=np.pad(rgb[..., ::-1], ((0, 0), (0, 1), (0, 0))).reshape(-1))
    np.testing.assert_array_equal(conv.image_to_rgb(bgr), rgb)
    mono = image_type(header=header(store), height=1, width=2, encoding='mono8', is_bigendian=0,
                      step=2, data=np.array([3, 9], np.uint8))
    assert conv.image_to_rgb(mono).tolist() == [[[3, 3, 3], [9, 9, 9]]]


@pytest.mark.parametrize('fields, reason', [
    (dict(encoding='yuv422', height=2, width=2, step=4, data=np.zeros(8, np.uint8)),
     'unsupported image encoding'),
    (dict(encoding='rgb8', height=4, width=4, step=12, data=np.zeros(10, np.uint8)),
     'image data has 10 bytes'),
    (dict(encoding='rgb8', height=0, width=0, step=0, data=np.zeros(0, np.uint8)),
     'empty image'),
])
def test_bad_images_are_rejected_with_reason(store, fields, reason):
    msg = store.types['sensor_msgs/msg/Image'](header=header(store), is_bigendian=0, **fields)
    with pytest.raises(ValueError, match=reason):
        conv.check_image(msg)


def test_compressed_image_round_trip(store):
    rgb = np.full((16, 16, 3), (200, 30, 60), np.uint8)
    msg = conv.rgb_to_compressed(store.types['sensor_msgs/msg/CompressedImage'],
                                 header(store), rgb, as_numpy=True)
    back = cdr_round_trip(store, msg, 'sensor_msgs/msg/CompressedImage')
    assert back.format.endswith('jpeg compressed bgr8')
    assert np.abs(conv.compressed_to_rgb(back).astype(int) - rgb).max() < 8


def test_actions_through_float32_multiarray(store):
    cls = store.types['std_msgs/msg/Float32MultiArray']
    layout = store.types['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0)
    space = ActionSpace.bridge()
    msg = cls(layout=layout, data=np.array([0.2, 0, 0, 0, 0, 0, 2.0], np.float32))
    back = cdr_round_trip(store, msg, 'std_msgs/msg/Float32MultiArray')
    np.testing.assert_allclose(conv.action_from_floats(back.data, space),
                               [0.05, 0, 0, 0, 0, 0, 1.0])
    for bad, reason in (([0.0] * 6, 'shape'), ([np.inf] + [0.0] * 6, 'non-finite')):
        with pytest.raises(ValueError, match=reason):
            conv.action_from_floats(bad, space)


def test_envelope_bytes_through_uint8_multiarray(store):
    from robot_rl.transport import decode_weights, encode_weights
    blob = encode_weights({'w': np.arange(4, dtype=np.float32)}, 2, {'policy': 'p'})
    cls = store.types['std_msgs/msg/UInt8MultiArray']
    layout = store.types['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0)
    back = cdr_round_trip(store, cls(layout=layout, data=np.frombuffer(blob, np.uint8)),
                          'std_msgs/msg/UInt8MultiArray')
    assert decode_weights(conv.uint8_multiarray_bytes(back)).version == 2


def test_empty_instruction_rejected():
    assert conv.check_instruction('  stack the block ') == 'stack the block'
    with pytest.raises(ValueError, match='empty'):
        conv.check_instruction(' ')


def test_arm_commander_stays_within_joint_limits_and_workspace():
    low, high = [0.12, -0.25, 0.015, -0.8, -0.8, -2.0], [0.45, 0.25, 0.25, 0.8, 0.8, 2.0]
    arm = ArmCommander(low, high, max_joint_step=0.3)
    rng = np.random.default_rng(0)
    previous = arm.joints.copy()
    for _ in range(60):
        action = rng.uniform(-1, 1, 7) * [0.2, 0.2, 0.2, 1, 1, 1, 2]  # often out of bounds
        joints, gripper, applied = arm.step(action)
        assert np.all(joints >= arm.ik.lower - 1e-9) and np.all(joints <= arm.ik.upper + 1e-9)
        assert np.all(np.abs(joints - previous) <= 0.3 + 1e-9)
        assert 0.0 <= gripper <= 1.0 and np.all(np.abs(applied[:3]) <= 0.05)
        assert np.all(arm.target_pos >= low[:3]) and np.all(arm.target_pos <= high[:3])
        previous = joints
    before = arm.joints.copy()
    with pytest.raises(ValueError):
        arm.step([np.nan] * 7)
    np.testing.assert_array_equal(arm.joints, before)


def test_arm_commander_tracks_a_small_move():
    arm = ArmCommander([0.12, -0.25, 0.015, -0.8, -0.8, -2.0], [0.45, 0.25, 0.25, 0.8, 0.8, 2.0])
    start = arm.state()[:3]
    for _ in range(3):
        arm.step([0.01, 0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(arm.state()[:3] - start, [0.03, 0, 0], atol=2e-3)


def test_clamp_joint_step_and_watchdog():
    out = clamp_joint_step(np.zeros(2), np.array([1.0, -5.0]), np.array([-1, -1.0]),
                           np.array([1, 1.0]), 0.5)
    np.testing.assert_allclose(out, [0.5, -0.5])
    dog = Watchdog(0.4)
    assert dog.expired(0.0)
    dog.feed(1.0)
    assert not dog.expired(1.3) and dog.expired(1.5)
