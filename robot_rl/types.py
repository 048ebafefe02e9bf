"""Core data types shared by every layer: observations, episodes and the action space.

Nothing here imports ROS, TensorFlow or MuJoCo; everything above builds on these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import numpy as np

ACTION_DIM = 7
"""[dx, dy, dz, droll, dpitch, dyaw, gripper] (Bridge conventions, gripper 1 = open)."""
STATE_DIM = 7
"""[x, y, z, roll, pitch, yaw, gripper] of the end effector."""
CONTROL_HZ = 5.0

# Observation keys (gymnasium observation dict and policy input).
IMAGE_KEY = 'image_primary'
STATE_KEY = 'state'

# Sparse reward convention: 0 on the step that reaches success (terminal), -1 otherwise.
REWARD_SUCCESS = 0.0
REWARD_STEP = -1.0

Observation = Dict[str, np.ndarray]
"""{'image_primary': uint8 (H, W, 3), 'state': float32 (7,)}."""


@dataclasses.dataclass(frozen=True, eq=False)
class ActionSpace:
    """Bounds of the 7-d action and the one normaliser a checkpoint carries.

    `normalise` maps [low, high] affinely onto [-1, 1]; `unnormalise` is its inverse. The same
    object is saved with every checkpoint and used unchanged in training and deployment.
    """

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self):
        low = np.asarray(self.low, dtype=np.float32).reshape(-1)
        high = np.asarray(self.high, dtype=np.float32).reshape(-1)
        if low.shape != high.shape:
            raise ValueError(f'ActionSpace: low {low.shape} and high {high.shape} differ in shape')
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError('ActionSpace: bounds must be finite')
        if np.any(high <= low):
            raise ValueError(f'ActionSpace: every high must exceed its low, got {low} / {high}')
        object.__setattr__(self, 'low', low)
        object.__setattr__(self, 'high', high)

    def __eq__(self, other):
        return (isinstance(other, ActionSpace) and np.array_equal(self.low, other.low)
                and np.array_equal(self.high, other.high))

    def __hash__(self):
        return hash((self.low.tobytes(), self.high.tobytes()))

    @classmethod
    def bridge(cls) -> 'ActionSpace':
        """WidowX/Bridge limits: +-5 cm and +-0.25 rad per step, gripper in [0, 1]."""
        return cls(low=np.array([-0.05] * 3 + [-0.25] * 3 + [0.0]),
                   high=np.array([0.05] * 3 + [0.25] * 3 + [1.0]))

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])

    def check(self, action: Any) -> np.ndarray:
        """Validate one action and clip it into bounds.

        Raises ValueError naming the problem for a wrong shape or a non-finite entry; a finite
        out-of-range action is clipped (never an error: a policy overshooting is normal).
        """
        arr = np.asarray(action, dtype=np.float32)
        if arr.shape != self.low.shape:
            raise ValueError(f'action must have shape {self.low.shape}, got {arr.shape}')
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError('action has non-finite entries at indices '
                             f'{np.flatnonzero(bad).tolist()}: {arr.tolist()}')
        return self.clip(arr)

    def clip(self, actions: np.ndarray) -> np.ndarray:
        """Clip (..., dim) actions into [low, high]."""
        return np.clip(actions, self.low, self.high).astype(np.float32)

    def normalise(self, actions: np.ndarray) -> np.ndarray:
        """Environment units (..., dim) -> [-1, 1]."""
        return (2.0 * (np.asarray(actions, np.float32) - self.low) / (self.high - self.low) - 1.0
                ).astype(np.float32)

    def unnormalise(self, actions: np.ndarray) -> np.ndarray:
        """[-1, 1] (..., dim) -> environment units."""
        return ((np.asarray(actions, np.float32) + 1.0) * 0.5 * (self.high - self.low) + self.low
                ).astype(np.float32)

    def to_dict(self) -> Dict[str, list]:
        return {'low': self.low.tolist(), 'high': self.high.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ActionSpace':
        missing = {'low', 'high'} - set(d)
        if missing:
            raise ValueError(f'ActionSpace dict is missing {sorted(missing)}')
        return cls(low=np.asarray(d['low']), high=np.asarray(d['high']))


@dataclasses.dataclass
class Episode:
    """One episode in RLDS step layout (N steps; transitions are (step t, step t + 1)).

    Step t holds observation o_t, the action a_t taken from it and the reward r_t that followed.
    The last step (is_last) holds the final observation; its action and reward are padding when
    the episode was produced by our environment. A terminal last step (is_terminal) means the
    task ended there (success); a last step that is not terminal means a time-limit truncation.

    images:     uint8 (N, H, W, 3)  primary camera (RLDS observation.image_0)
    states:     float32 (N, 7)      end-effector state (observation.state)
    actions:    float32 (N, 7)
    rewards:    float32 (N,)
    discounts:  float32 (N,)
    is_first, is_last, is_terminal: bool (N,)
    language_instruction: the task's instruction
    mc_returns: float32 (N,) Monte-Carlo returns, filled when the episode closes
    metadata:   JSON-serialisable extras (task, seed, success, expert noise, ...)
    """

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    discounts: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    is_terminal: np.ndarray
    language_instruction: str
    mc_returns: Optional[np.ndarray] = None
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_transitions(self) -> int:
        return max(len(self) - 1, 0)

    @property
    def success(self) -> bool:
        return bool(self.is_terminal[-1]) if len(self) else False

    def validate(self) -> 'Episode':
        """Raise ValueError naming the first field whose shape or dtype is wrong."""
        n = len(self)
        if n < 2:
            raise ValueError(f'episode needs at least 2 steps, has {n}')
        expect = {
            'images': ((n, None, None, 3), np.uint8),
            'states': ((n, STATE_DIM), np.float32),
            'actions': ((n, ACTION_DIM), np.float32),
            'rewards': ((n,), np.float32),
            'discounts': ((n,), np.float32),
            'is_first': ((n,), np.bool_),
            'is_last': ((n,), np.bool_),
            'is_terminal': ((n,), np.bool_),
        }
        if self.mc_returns is not None:
            expect['mc_returns'] = ((n,), np.float32)
        for name, (shape, dtype) in expect.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                raise ValueError(f'episode.{name} must be a {np.dtype(dtype).name} array, got '
                                 f'{getattr(value, "dtype", type(value).__name__)}')
            if value.ndim != len(shape) or any(s is not None and s != v
                                               for s, v in zip(shape, value.shape)):
                raise ValueError(f'episode.{name} has shape {value.shape}, expected {shape}')
        if not self.is_first[0] or self.is_first[1:].any():
            raise ValueError('episode.is_first must be true on the first step only')
        if not self.is_last[-1] or self.is_last[:-1].any():
            raise ValueError('episode.is_last must be true on the last step only')
        if self.is_terminal[:-1].any():
            raise ValueError('episode.is_terminal may only be set on the last step')
        if not isinstance(self.language_instruction, str):
            raise ValueError('episode.language_instruction must be a str')
        return self


def fit_image(image: np.ndarray, size: Any, what: str = 'the model') -> np.ndarray:
    """An RGB uint8 image (H, W, 3) at `size` (height, width).

    A frame of another size is resized only when its aspect ratio matches (a camera at another
    resolution); any other shape is an error naming both sizes, never a silent distortion.
    """
    image = np.asarray(image)
    height, width = int(size[0]), int(size[1])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'{what} expects an RGB uint8 image (H, W, 3), got {image.dtype} '
                         f'{image.shape}')
    if image.shape[:2] == (height, width):
        return image
    if abs(image.shape[0] * width - image.shape[1] * height) > max(height, width):
        raise ValueError(f'{what} expects {height}x{width} images; got {image.shape[0]}x'
                         f'{image.shape[1]}, whose aspect ratio differs (resize or crop it first)')
    import cv2
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
