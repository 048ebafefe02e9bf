"""T0 (no ROS): SpaceMouse HID report parsing, the teleop delta (deadzone, scaling, axis map,
bounds, gripper toggle), and the hidraw reader on a real OS pipe standing in for /dev/hidraw."""

import os
import re
import struct

import numpy as np
import pytest

from robot_rl.episodes.arbiter import GRIPPER
from robot_rl.episodes.spacemouse import (check_axis_map, HidrawReader, parse_report,
                                          SpaceMouseReportError, SpaceMouseTeleop)
from robot_rl.types import ActionSpace


def translation(x, y, z):
    """Report id 1, 7 bytes: X, Y, Z as little-endian int16 (older devices)."""
    return struct.pack('<Bhhh', 1, x, y, z)


def rotation(rx, ry, rz):
    """Report id 2, 7 bytes: Rx, Ry, Rz."""
    return struct.pack('<Bhhh', 2, rx, ry, rz)


def six_axes(x, y, z, rx, ry, rz):
    """Report id 1, 13 bytes: all six axes (newer devices)."""
    return struct.pack('<Bhhhhhh', 1, x, y, z, rx, ry, rz)


def buttons(mask, size=2):
    """Report id 3: the bitmask over `size` bytes, little-endian."""
    return bytes([3]) + mask.to_bytes(size, 'little')


def test_reports_parse_per_layout():
    r = parse_report(bytes.fromhex('01 5e 01 a2 fe 00 80'))  # 350, -350, -32768
    assert r.report_id == 1 and r.translation == (350, -350, -32768) and r.rotation is None
    assert parse_report(rotation(-1, 2, -300)).rotation == (-1, 2, -300)
    both = parse_report(six_axes(1, -2, 3, -4, 5, -6))
    assert both.translation == (1, -2, 3) and both.rotation == (-4, 5, -6)
    assert parse_report(bytes.fromhex('03 02 00')).buttons == 0b10  # right button
    assert parse_report(buttons(1 << 9, 3)).buttons == 1 << 9       # bit 1 of the 2nd byte
    assert parse_report(bytes([0x17, 100])).battery == 100


@pytest.mark.parametrize('data, words', [
    (bytes([9, 0, 0]), 'id 9 (3 bytes: 09 00 00) is unknown'),
    (translation(0, 0, 0) + b'\x00', 'id 1 (8 bytes'),
    (rotation(0, 0, 0)[:5], 'id 2 (5 bytes'),
    (bytes([3]), 'id 3 (1 bytes'),
    (b'', 'empty'),
])
def test_malformed_reports_name_the_report(data, words):
    with pytest.raises(SpaceMouseReportError, match=re.escape(words)):
        parse_report(data)


def test_full_deflection_is_the_scaled_per_step_bound_in_the_robot_frame():
    teleop = SpaceMouseTeleop(deadzone=0.0, translation_scale=0.5, rotation_scale=1.0)
    # Cap pushed away from the person (-Y), to their left (-X), lifted (-Z), twisted
    # counter-clockwise seen from above (-Rz): +x, +y, +z, +yaw with the default map.
    teleop.feed(translation(-350, -350, -350))
    teleop.feed(rotation(0, 0, -350))
    np.testing.assert_allclose(teleop.action(), [0.025, 0.025, 0.025, 0, 0, 0.25, 1.0])
    teleop.feed(six_axes(350, 175, 0, 350, 350, 350))
    np.testing.assert_allclose(teleop.action(), [-0.0125, -0.025, 0, 0, 0, -0.25, 1.0])


def test_deadzone_and_overshoot():
    teleop = SpaceMouseTeleop(full_scale=350, deadzone=0.2, translation_scale=1.0)
    teleop.feed(translation(0, -69, 0))         # 0.197 of full scale: inside the deadzone
    assert not np.any(teleop.action()[:GRIPPER])
    teleop.feed(translation(0, -210, 0))        # 0.6 -> (0.6 - 0.2) / 0.8 = 0.5 of the bound
    np.testing.assert_allclose(teleop.action()[0], 0.025, rtol=1e-5)
    teleop.feed(translation(0, -32768, 32767))  # far past full scale: clipped to the bounds
    action = teleop.action()
    space = ActionSpace.bridge()
    assert np.all(action >= space.low) and np.all(action <= space.high)
    np.testing.assert_allclose(action[[0, 2]], [0.05, -0.05])


def test_latest_state_not_a_sum():
    teleop = SpaceMouseTeleop(deadzone=0.0, translation_scale=1.0)
    for _ in range(5):
        teleop.feed(translation(0, -350, 0))
    np.testing.assert_allclose(teleop.action()[0], 0.05)   # five reports, one step's bound
    teleop.feed(translation(0, 0, 0))                      # released: zero motion
    np.testing.assert_allclose(teleop.action(), [0, 0, 0, 0, 0, 0, 1])


def test_axis_map_turns_on_roll_and_pitch():
    teleop = SpaceMouseTeleop(deadzone=0.0, rotation_scale=1.0, axis_map=(-2, -1, -3, -5, -4, -6))
    teleop.feed(rotation(350, -350, 0))
    np.testing.assert_allclose(teleop.action()[3:6], [0.25, -0.25, 0.0])


@pytest.mark.parametrize('axis_map, words', [
    ((1, 2, 3), '6 integers'),
    ((1, 2, 3, 4, 5, 7), 'in -6..6'),
    ((1, -1, 3, 0, 0, 6), 'one device axis'),
    ((1.0, 2, 3, 0, 0, 6), '6 integers'),
])
def test_bad_axis_map(axis_map, words):
    with pytest.raises(ValueError, match=words):
        check_axis_map(axis_map)


def test_gripper_toggles_on_the_press_edge_only():
    teleop = SpaceMouseTeleop()
    assert teleop.action()[GRIPPER] == 1.0
    teleop.feed(buttons(0b01))
    assert teleop.action()[GRIPPER] == 0.0
    teleop.feed(buttons(0b01))                  # still held: no second toggle
    teleop.feed(buttons(0b11))                  # another button joins: no toggle either
    assert teleop.action()[GRIPPER] == 0.0
    teleop.feed(buttons(0b00))
    teleop.feed(buttons(0b01))                  # pressed again
    assert teleop.action()[GRIPPER] == 1.0
    other = SpaceMouseTeleop(gripper_button=1)
    other.feed(buttons(0b01))
    assert other.action()[GRIPPER] == 1.0       # not its button
    other.feed(buttons(0b10))
    assert other.action()[GRIPPER] == 0.0


def test_gripper_follows_the_arm_until_a_takeover():
    teleop = SpaceMouseTeleop()
    teleop.executed([0.0] * 6 + [0.0])          # the policy closed the gripper
    assert teleop.action()[GRIPPER] == 0.0      # taking over keeps it closed
    teleop.set_intervention(True)
    teleop.feed(buttons(1))
    teleop.executed([0.0] * 6 + [0.0])          # an older executed action arriving late
    assert teleop.action()[GRIPPER] == 1.0      # the person's toggle stands


def test_a_malformed_report_leaves_the_state():
    teleop = SpaceMouseTeleop(deadzone=0.0)
    teleop.feed(translation(0, -350, 0))
    before = teleop.action()
    with pytest.raises(SpaceMouseReportError):
        teleop.feed(bytes([1, 0, 0]))
    np.testing.assert_array_equal(teleop.action(), before)


def test_bad_settings():
    for kwargs in ({'deadzone': 1.0}, {'full_scale': 0}, {'translation_scale': 0},
                   {'rotation_scale': 1.5}, {'gripper_button': -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SpaceMouseTeleop(**kwargs)


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    fds = {'write': write_fd}
    yield HidrawReader(read_fd, 'pipe'), fds
    if fds['write'] is not None:
        os.close(fds['write'])


def test_reader_on_a_pipe_reads_reports_and_never_blocks(pipe):
    reader, fds = pipe
    assert reader.read_reports() == [] and reader.gone is None   # nothing yet: no blocking
    teleop = SpaceMouseTeleop(deadzone=0.0, translation_scale=1.0)
    for report in (translation(0, -350, 0), buttons(1)):
        os.write(fds['write'], report)
        (data,) = reader.read_reports()
        assert data == report
        teleop.feed(data)
    np.testing.assert_allclose(teleop.action(), [0.05, 0, 0, 0, 0, 0, 0])
    assert reader.gone is None


def test_reader_marks_the_device_gone_when_the_writer_closes(pipe):
    reader, fds = pipe
    os.write(fds['write'], translation(1, 2, 3))
    os.close(fds['write'])
    fds['write'] = None
    assert reader.read_reports() == [translation(1, 2, 3)]   # what was sent still arrives
    assert 'pipe is gone (end of file)' in reader.gone
    assert reader.fd is None
    assert reader.read_reports() == []                       # and later reads do not raise


def test_reader_marks_a_read_error_gone():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    reader = HidrawReader(write_fd, 'write end')   # reading a write-only end: EBADF
    assert reader.read_reports() == []
    assert 'write end is gone (read error EBADF' in reader.gone


def test_open_names_a_missing_device(tmp_path):
    with pytest.raises(OSError, match=f'cannot open SpaceMouse device {tmp_path}/hidraw9'):
        HidrawReader.open(str(tmp_path / 'hidraw9'))
