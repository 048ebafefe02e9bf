"""SpaceMouse (3Dconnexion) teleoperation: raw HID reports -> one bounded 7-d delta per step.

A person takes over the arm with a SpaceMouse the same way as with the keyboard
(robot_rl.episodes.keyboard): the device node publishes `teleop/action` and the policy node's
arbiter runs it while the episode manager says a person has taken over. Plain Python (no ROS);
the device is read straight from Linux hidraw (/dev/hidraw*), so no vendor driver, spacenavd or
HID library is needed.

HID reports of 3Dconnexion devices (one report per read() on hidraw; the first byte is the
report id; axes are little-endian int16, about +-350 at full deflection):

    id 1, 7 bytes    translation X, Y, Z                  (SpaceNavigator, SpaceMouse Pro/Compact)
    id 2, 7 bytes    rotation Rx, Ry, Rz
    id 1, 13 bytes   X, Y, Z, Rx, Ry, Rz in one report    (SpaceMouse Wireless, Enterprise, ...)
    id 3, >= 2 bytes button bitmask, little-endian: bit i of byte 1 + k is button 8 k + i
                     (SpaceNavigator: bit 0 left, bit 1 right)
    id 0x17          battery level of wireless devices: recognised, not used

The device frame is the HID one: +X right, +Y toward the user, +Z down (pushing the cap down),
Rx/Ry/Rz right-handed about those axes (+Rz = clockwise seen from above). Any other id or a
wrong length raises SpaceMouseReportError naming the report.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from robot_rl.episodes.arbiter import GRIPPER
from robot_rl.types import ActionSpace

REPORT_TRANSLATION, REPORT_ROTATION, REPORT_BUTTONS, REPORT_BATTERY = 0x01, 0x02, 0x03, 0x17
FULL_SCALE = 350.0
"""Raw axis value at full deflection (the drivers' convention; a few devices overshoot a little,
which the normalisation clips)."""
READ_SIZE = 64
"""Bytes asked of each read(): larger than any report (hidraw returns one whole report)."""

DEVICE_AXES = ('X', 'Y', 'Z', 'Rx', 'Ry', 'Rz')
ROBOT_AXES = ('x', 'y', 'z', 'roll', 'pitch', 'yaw')
DEFAULT_AXIS_MAP = (-2, -1, -3, 0, 0, -6)
"""The one place where device axes become robot axes: entry i drives robot axis ROBOT_AXES[i]
(x forward, y left, z up, roll, pitch, yaw about them) from device axis DEVICE_AXES[|k| - 1]
with the sign of k; 0 leaves that robot axis still.

The default assumes the person stands behind the arm, facing the way it reaches (robot +x away
from them): push the cap away -> +x (-Y), push it left -> +y (-X), lift it -> +z (-Z), twist it
counter-clockwise seen from above -> +yaw (-Rz). Roll and pitch are off, like the keyboard;
with them on, roll is -Ry and pitch is -Rx (map (-2, -1, -3, -5, -4, -6)). Standing in front
of the arm, facing it, flip x and y: (2, 1, -3, 0, 0, -6).
"""


class SpaceMouseReportError(ValueError):
    """A HID report that is not a 3Dconnexion axis, button or battery report."""


@dataclasses.dataclass(frozen=True)
class HidReport:
    """One parsed report; fields the report does not carry are None."""

    report_id: int
    translation: Optional[Tuple[int, int, int]] = None
    """Raw X, Y, Z."""
    rotation: Optional[Tuple[int, int, int]] = None
    """Raw Rx, Ry, Rz."""
    buttons: Optional[int] = None
    """Bitmask of the buttons held down."""
    battery: Optional[int] = None
    """Battery level (wireless devices), as the device reports it."""


def _int16s(data: bytes, start: int, count: int) -> Tuple[int, ...]:
    return tuple(int(v) for v in np.frombuffer(data, '<i2', count, start))


def parse_report(data: bytes) -> HidReport:
    """Raw report bytes (report id first) -> HidReport; SpaceMouseReportError if malformed."""
    data = bytes(data)
    if not data:
        raise SpaceMouseReportError('empty SpaceMouse report (0 bytes)')
    report_id, n = data[0], len(data)

    def bad(expected: str) -> SpaceMouseReportError:
        return SpaceMouseReportError(f'SpaceMouse report id {report_id} ({n} bytes: '
                                     f'{data.hex(" ")}): expected {expected}')

    if report_id == REPORT_TRANSLATION:
        if n == 7:
            return HidReport(report_id, translation=_int16s(data, 1, 3))
        if n == 13:
            return HidReport(report_id, translation=_int16s(data, 1, 3),
                             rotation=_int16s(data, 7, 3))
        raise bad('7 bytes (translation) or 13 bytes (translation and rotation)')
    if report_id == REPORT_ROTATION:
        if n != 7:
            raise bad('7 bytes (rotation)')
        return HidReport(report_id, rotation=_int16s(data, 1, 3))
    if report_id == REPORT_BUTTONS:
        if n < 2:
            raise bad('at least 2 bytes (button bitmask)')
        return HidReport(report_id, buttons=int.from_bytes(data[1:], 'little'))
    if report_id == REPORT_BATTERY:
        if n < 2:
            raise bad('at least 2 bytes (battery level)')
        return HidReport(report_id, battery=int(data[1]))
    raise SpaceMouseReportError(
        f'SpaceMouse report id {report_id} ({n} bytes: {data.hex(" ")}) is unknown; known: '
        f'{REPORT_TRANSLATION} translation, {REPORT_ROTATION} rotation, {REPORT_BUTTONS} '
        f'buttons, {REPORT_BATTERY} battery')


def check_axis_map(axis_map: Sequence[int]) -> Tuple[int, ...]:
    """A valid axis map (see DEFAULT_AXIS_MAP) as a tuple; ValueError naming the problem."""
    values = tuple(axis_map)
    if len(values) != len(ROBOT_AXES) or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in values):
        raise ValueError(f'axis_map must be {len(ROBOT_AXES)} integers (one per robot axis '
                         f'{ROBOT_AXES}), got {list(values)}')
    out_of_range = [k for k in values if abs(k) > len(DEVICE_AXES)]
    if out_of_range:
        raise ValueError(f'axis_map entries must be in -6..6 (signed device axis 1..6 of '
                         f'{DEVICE_AXES}, 0 = off), got {out_of_range}')
    used = [abs(k) for k in values if k]
    if len(used) != len(set(used)):
        raise ValueError(f'axis_map drives two robot axes from one device axis: {list(values)}')
    return tuple(int(k) for k in values)


class SpaceMouseTeleop:
    """The latest device state -> one end-effector delta (7,) per control period.

    Each raw axis is divided by `full_scale` and clipped to [-1, 1]; values within `deadzone`
    count as 0 and the rest is rescaled so the output starts at 0 past the deadzone and reaches
    1 at full deflection. The axis map (DEFAULT_AXIS_MAP) turns device axes into robot axes;
    full deflection moves `translation_scale` (or `rotation_scale`) of the robot's per-step
    bound (ActionSpace.bridge(): 5 cm, 0.25 rad), and the action is clipped into the bounds.
    The latest state is used, not a sum over the period: a device at rest or released sends
    nothing new and gives zero motion. A press of `gripper_button` (its rising edge) toggles
    the gripper (1 open, 0 closed), as the keyboard's `g` does.

    Until a person takes over, `executed` keeps the gripper at the arm's last command, so
    taking over never opens or closes the gripper by itself.
    """

    def __init__(self, full_scale: float = FULL_SCALE, deadzone: float = 0.1,
                 translation_scale: float = 0.4, rotation_scale: float = 0.4,
                 axis_map: Sequence[int] = DEFAULT_AXIS_MAP, gripper_button: int = 0,
                 bounds: Optional[ActionSpace] = None, gripper: float = 1.0):
        if full_scale <= 0:
            raise ValueError(f'full_scale must be > 0, got {full_scale}')
        if not 0.0 <= deadzone < 1.0:
            raise ValueError(f'deadzone must be in [0, 1), got {deadzone}')
        for name, value in (('translation_scale', translation_scale),
                            ('rotation_scale', rotation_scale)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f'{name} must be in (0, 1] (a fraction of the per-step '
                                 f'bound), got {value}')
        if gripper_button < 0:
            raise ValueError(f'gripper_button must be >= 0, got {gripper_button}')
        self.bounds = bounds or ActionSpace.bridge()
        self.axis_map = check_axis_map(axis_map)
        self.full_scale, self.deadzone = float(full_scale), float(deadzone)
        self.scales = np.array([translation_scale] * 3 + [rotation_scale] * 3, np.float32)
        self.gripper_button = int(gripper_button)
        self.gripper = float(gripper)
        self.raw = np.zeros(len(DEVICE_AXES), np.float32)
        """Latest raw X, Y, Z, Rx, Ry, Rz."""
        self.buttons = 0
        self.intervening = False

    def feed(self, data: bytes) -> HidReport:
        """Parse one raw report and apply it; SpaceMouseReportError leaves the state as it was."""
        report = parse_report(data)
        self.update(report)
        return report

    def update(self, report: HidReport) -> None:
        if report.translation is not None:
            self.raw[:3] = report.translation
        if report.rotation is not None:
            self.raw[3:] = report.rotation
        if report.buttons is not None:
            mask = 1 << self.gripper_button
            if report.buttons & mask and not self.buttons & mask:
                self.gripper = 0.0 if self.gripper >= 0.5 else 1.0  # as KeyboardTeleop
            self.buttons = report.buttons

    def set_intervention(self, active: bool) -> None:
        """A person has taken over (True) or handed control back (False)."""
        self.intervening = bool(active)

    def executed(self, action: Sequence[float]) -> None:
        """The arm's executed action: its gripper is adopted while nobody has taken over."""
        if not self.intervening:
            self.gripper = float(np.asarray(action, np.float32).reshape(-1)[GRIPPER])

    def robot_axes(self) -> np.ndarray:
        """(6,) robot-frame deflections in [-1, 1] after the deadzone and the axis map."""
        norm = np.clip(self.raw / self.full_scale, -1.0, 1.0)
        mag = np.clip((np.abs(norm) - self.deadzone) / (1.0 - self.deadzone), 0.0, 1.0)
        device = np.sign(norm) * mag
        out = np.zeros(len(ROBOT_AXES), np.float32)
        for i, k in enumerate(self.axis_map):
            if k:
                out[i] = np.sign(k) * device[abs(k) - 1]
        return out

    def action(self) -> np.ndarray:
        """This period's delta (7,): deflections times the per-step bounds, gripper, clipped."""
        axes = self.robot_axes() * self.scales
        low, high = self.bounds.low[:GRIPPER], self.bounds.high[:GRIPPER]
        delta = np.where(axes >= 0, axes * high, -axes * low)
        return self.bounds.check(np.append(delta, self.gripper))


class HidrawReader:
    """Non-blocking reads of raw reports from a hidraw device (or any file descriptor).

    `read_reports()` returns every report waiting (hidraw gives one report per read) and never
    blocks. A read error (an unplugged hidraw device answers EIO or ENODEV) or end of file (the
    writer of a pipe closed) marks the device gone: `gone` holds the reason, the descriptor is
    closed, and later calls return nothing. Nothing here raises once the device is open.
    """

    def __init__(self, fd: int, name: str):
        self.fd: Optional[int] = fd
        self.name = name
        self.gone: Optional[str] = None
        os.set_blocking(fd, False)

    @classmethod
    def open(cls, path: str) -> 'HidrawReader':
        """Open `path` for reading; OSError (with the path) when it cannot be opened."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise OSError(exc.errno, f'cannot open SpaceMouse device {path}: {exc.strerror} '
                          '(is it plugged in, and readable by this user? see '
                          'ls -l /dev/hidraw*)') from exc
        return cls(fd, path)

    def read_reports(self, max_reports: int = 1000) -> List[bytes]:
        """Every report waiting, oldest first (at most `max_reports` per call)."""
        reports: List[bytes] = []
        while self.fd is not None and len(reports) < max_reports:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(f'read error {errno.errorcode.get(exc.errno, exc.errno)}: '
                           f'{exc.strerror}')
                break
            if not data:
                self._lost('end of file')
                break
            reports.append(data)
        return reports

    def _lost(self, reason: str) -> None:
        self.gone = f'SpaceMouse device {self.name} is gone ({reason})'
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
