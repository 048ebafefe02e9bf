"""Keyboard control of a session over SSH: the key map, keyboard teleoperation, a raw terminal.

Plain terminal I/O (termios), no curses: it works in any SSH session and in tmux. The same
command names travel on the manager's command topic, so a foot pedal or a script can send them.
"""

from __future__ import annotations

import os
import select
import sys
from typing import Dict, List, Optional

import numpy as np

from robot_rl.episodes.arbiter import GRIPPER
from robot_rl.types import ActionSpace

# Commands (the episode manager's vocabulary; also accepted on its command topic).
START, SUCCESS, FAILURE, END = 'start', 'success', 'failure', 'end'
PAUSE, ESTOP, RELEASE, TAKEOVER, QUIT = 'pause', 'estop', 'release', 'takeover', 'quit'

KEY_COMMANDS: Dict[str, str] = {
    'n': START,      # next episode (reset, then run)
    's': SUCCESS,    # label: success (ends the running episode, or labels the last one late)
    'f': FAILURE,    # label: failure
    'e': END,        # end the episode unlabelled (a late label may follow)
    'p': PAUSE,      # pause / resume
    ' ': ESTOP,      # emergency stop (space: the biggest key)
    'R': RELEASE,    # release the e-stop (shift-r: deliberate)
    't': TAKEOVER,   # take over with the keyboard / hand back to the policy
    'q': QUIT,
}
COMMANDS = frozenset(KEY_COMMANDS.values())

# Teleoperation keys while taken over: (action index, sign). Translation on i/k, j/l, u/o
# (x forward, y left, z up), yaw on , and ., and g toggles the gripper.
TELEOP_KEYS: Dict[str, tuple] = {
    'i': (0, 1.0), 'k': (0, -1.0),
    'j': (1, 1.0), 'l': (1, -1.0),
    'u': (2, 1.0), 'o': (2, -1.0),
    ',': (5, 1.0), '.': (5, -1.0),
}
GRIPPER_KEY = 'g'

HELP = ('keys: n next episode | s success | f failure | e end unlabelled | p pause/resume | '
        'SPACE e-stop | R release e-stop | t take over/hand back | q quit\n'
        'taken over: i/k +-x  j/l +-y  u/o +-z  ,/. +-yaw  g gripper')


def command_for_key(key: str) -> Optional[str]:
    """The command a key stands for, or None (teleop keys and unknown keys)."""
    return KEY_COMMANDS.get(key)


class KeyboardTeleop:
    """Keys pressed during one control period -> one bounded end-effector delta (7,).

    Each press moves `step_m` (translation) or `step_rad` (yaw) along its axis; presses add up
    and the sum is clipped to the robot's per-step bounds (+-5 cm, +-0.25 rad). `g` toggles the
    gripper (1 open, 0 closed). `action()` returns the delta and starts the next period.
    """

    def __init__(self, step_m: float = 0.01, step_rad: float = 0.1,
                 bounds: Optional[ActionSpace] = None, gripper: float = 1.0):
        if step_m <= 0 or step_rad <= 0:
            raise ValueError(f'step_m and step_rad must be > 0, got {step_m}, {step_rad}')
        self.bounds = bounds or ActionSpace.bridge()
        self.steps = np.zeros(GRIPPER)
        self.step_m, self.step_rad = step_m, step_rad
        self.gripper = float(gripper)

    def press(self, key: str) -> bool:
        """Apply a key; False when it is not a teleop key."""
        if key == GRIPPER_KEY:
            self.gripper = 0.0 if self.gripper >= 0.5 else 1.0
            return True
        if key not in TELEOP_KEYS:
            return False
        axis, sign = TELEOP_KEYS[key]
        self.steps[axis] += sign * (self.step_m if axis < 3 else self.step_rad)
        return True

    def action(self) -> np.ndarray:
        action = np.append(self.steps, self.gripper).astype(np.float32)
        self.steps = np.zeros(GRIPPER)
        return self.bounds.clip(action)


class RawTerminal:
    """Single keypresses from a TTY without Enter (termios cbreak mode), restored on close.

    `available` is False when stdin is not a terminal (launch files, tests): then `keys()`
    returns nothing and the command topic is the way in.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.available = False
        self._saved = None
        try:
            self.fd = self.stream.fileno()
            self.available = os.isatty(self.fd)
        except (AttributeError, OSError, ValueError):
            self.fd = None
        if self.available:
            import termios
            import tty
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def keys(self) -> List[str]:
        """Every key typed since the last call (never blocks)."""
        out: List[str] = []
        while self.available and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break
            out += list(data.decode(errors='replace'))
        return out

    def close(self) -> None:
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def status_line(status: Dict[str, object], last_action: Optional[np.ndarray], version: int,
                source: str = '') -> str:
    """One line of live state: phase, episode, step, last action, weights version."""
    action = ('-' if last_action is None
              else ' '.join(f'{x:+.3f}' for x in np.asarray(last_action)[:3]) +
              f' g{float(np.asarray(last_action)[GRIPPER]):.0f}')
    awaiting = status.get('awaiting_label') or []
    parts = [f'[{str(status["phase"]).upper()}]', f'ep {status["episode"]}',
             f'step {status["step"]}', f'action {action}', f'weights v{version}']
    if source:
        parts.append(f'control {source}')
    if awaiting:
        parts.append(f'label? {awaiting}')
    if status.get('message'):
        parts.append(str(status['message']))
    if status.get('classifier'):
        parts.append(str(status['classifier']))
    return ' | '.join(parts)
