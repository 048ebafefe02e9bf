"""Transitions on the wire: batches of RLDS step records from one episode of one actor.

A step record is one RLDS step (Bridge names): observation o_t (image, 7-d state), the action a_t
taken from it, the reward r_t that followed, is_first / is_last / is_terminal, plus the weight
version of the policy that chose a_t. Transition t is (step t, step t + 1), exactly as in
`robot_rl.data.replay`. Images travel JPEG- or PNG-encoded (OpenCV); frames are RGB uint8.

Schema 'robot_rl.steps/1' (N steps, one episode):
    images_encoded  uint8 (total_bytes,)  concatenated encoded frames
    image_offsets   int64 (N + 1,)        frame i is images_encoded[offsets[i]:offsets[i + 1]]
    states          float32 (N, 7)
    actions         float32 (N, 7)
    rewards         float32 (N,)
    flags           uint8 (N, 3)          is_first, is_last, is_terminal
    step_index      int64 (N,)            t within the episode, strictly increasing
    policy_version  int64 (N,)
    interventions   uint8 (N,)            optional: 1 = a person's action (teleoperation), stored
                                          as executed; absent (older actors) = all 0
    meta: actor (str), episode (int >= 0), instruction (non-empty str), image_format
          ('jpeg' | 'png'), image_shape [H, W, 3]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from robot_rl.transport.envelope import (decode, encode, EnvelopeError, register_schema,
                                         require)
from robot_rl.types import ACTION_DIM, STATE_DIM

STEPS_SCHEMA = 'robot_rl.steps/1'
IMAGE_FORMATS = {'jpeg': '.jpg', 'png': '.png'}


@dataclasses.dataclass
class StepRecord:
    """One RLDS step: image uint8 (H, W, 3) RGB, state float32 (7,), action float32 (7,)."""

    step: int
    image: np.ndarray
    state: np.ndarray
    action: np.ndarray
    reward: float
    is_first: bool
    is_last: bool
    is_terminal: bool
    policy_version: int = 0
    intervention: bool = False
    """The action was a person's (teleoperation), not the policy's."""


@dataclasses.dataclass
class StepBatch:
    """Decoded steps of one episode of one actor; `seq` is the actor's batch sequence number."""

    actor: str
    episode: int
    instruction: str
    seq: int
    steps: List[StepRecord]

    @property
    def key(self) -> Tuple[str, int]:
        return self.actor, self.episode


def encode_image(image: np.ndarray, image_format: str = 'jpeg', quality: int = 95) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG/PNG bytes (OpenCV)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {sorted(IMAGE_FORMATS)}')
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if image_format == 'jpeg' else []
    ok, buf = cv2.imencode(IMAGE_FORMATS[image_format], image[..., ::-1], params)
    if not ok:
        raise ValueError(f'OpenCV could not encode a {image.shape} image as {image_format}')
    return buf.tobytes()


def decode_image(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Encoded bytes (uint8 array) -> RGB uint8 (H, W, 3); EnvelopeError if undecodable."""
    bgr = cv2.imdecode(np.asarray(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
    if bgr is None or tuple(bgr.shape) != tuple(shape):
        raise EnvelopeError(f'image does not decode to shape {tuple(shape)}')
    return np.ascontiguousarray(bgr[..., ::-1])


def encode_steps(steps: Sequence[StepRecord], *, actor: str, episode: int, instruction: str,
                 seq: int, image_format: str = 'jpeg', quality: int = 95) -> bytes:
    """Envelope bytes for `steps` (one episode, in order)."""
    if not steps:
        raise ValueError('encode_steps needs at least one step')
    frames = [np.frombuffer(encode_image(s.image, image_format, quality), np.uint8)
              for s in steps]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
    arrays = {
        'images_encoded': np.concatenate(frames),
        'image_offsets': offsets,
        'states': np.stack([np.asarray(s.state, np.float32) for s in steps]),
        'actions': np.stack([np.asarray(s.action, np.float32) for s in steps]),
        'rewards': np.array([s.reward for s in steps], np.float32),
        'flags': np.array([[s.is_first, s.is_last, s.is_terminal] for s in steps], np.uint8),
        'step_index': np.array([s.step for s in steps], np.int64),
        'policy_version': np.array([s.policy_version for s in steps], np.int64),
        'interventions': np.array([s.intervention for s in steps], np.uint8),
    }
    meta = {'actor': actor, 'episode': int(episode), 'instruction': instruction,
            'image_format': image_format, 'image_shape': list(steps[0].image.shape)}
    return encode(STEPS_SCHEMA, seq, arrays, meta)


def decode_steps(data: bytes) -> StepBatch:
    """Verify and decode a steps envelope; EnvelopeError names the first problem."""
    env = decode(data, STEPS_SCHEMA)
    a, meta = env.arrays, env.meta
    offsets = a['image_offsets']
    images = [decode_image(a['images_encoded'][offsets[i]:offsets[i + 1]], meta['image_shape'])
              for i in range(len(offsets) - 1)]
    flags = a['flags'].astype(bool)
    interventions = a['interventions'].astype(bool) if 'interventions' in a else \
        np.zeros(len(images), bool)
    steps = [StepRecord(step=int(a['step_index'][i]), image=images[i],
                        state=a['states'][i].copy(), action=a['actions'][i].copy(),
                        reward=float(a['rewards'][i]), is_first=bool(flags[i, 0]),
                        is_last=bool(flags[i, 1]), is_terminal=bool(flags[i, 2]),
                        policy_version=int(a['policy_version'][i]),
                        intervention=bool(interventions[i]))
             for i in range(len(images))]
    return StepBatch(actor=meta['actor'], episode=meta['episode'],
                     instruction=meta['instruction'], seq=env.number, steps=steps)


@register_schema(STEPS_SCHEMA)
def _check_steps(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    _check_steps_meta(meta)
    offsets = require(arrays, 'image_offsets', np.int64, (None,))
    n = len(offsets) - 1
    if n < 1:
        raise EnvelopeError('a steps envelope needs at least one step')
    encoded = require(arrays, 'images_encoded', np.uint8, (None,))
    if offsets[0] != 0 or offsets[-1] != len(encoded) or np.any(np.diff(offsets) <= 0):
        raise EnvelopeError('image_offsets must rise strictly from 0 to len(images_encoded)')
    for name, shape, dtype in (('states', (n, STATE_DIM), np.float32),
                               ('actions', (n, ACTION_DIM), np.float32),
                               ('rewards', (n,), np.float32), ('flags', (n, 3), np.uint8),
                               ('step_index', (n,), np.int64),
                               ('policy_version', (n,), np.int64)):
        arr = require(arrays, name, dtype, shape)
        if arr.dtype.kind == 'f' and not np.isfinite(arr).all():
            raise EnvelopeError(f'array {name!r} has non-finite values')
    steps = arrays['step_index']
    if steps[0] < 0 or np.any(np.diff(steps) <= 0):
        raise EnvelopeError('step_index must be non-negative and strictly increasing')
    if arrays['flags'].max() > 1:
        raise EnvelopeError('flags must be 0 or 1')
    if 'interventions' in arrays:
        if require(arrays, 'interventions', np.uint8, (n,)).max() > 1:
            raise EnvelopeError('interventions must be 0 or 1')


def _check_steps_meta(meta: Mapping[str, Any]) -> None:
    if not isinstance(meta.get('actor'), str) or not meta['actor']:
        raise EnvelopeError('meta.actor must be a non-empty string')
    if not isinstance(meta.get('episode'), int) or meta['episode'] < 0:
        raise EnvelopeError('meta.episode must be a non-negative integer')
    if not isinstance(meta.get('instruction'), str) or not meta['instruction'].strip():
        raise EnvelopeError('meta.instruction must be a non-empty string')
    if meta.get('image_format') not in IMAGE_FORMATS:
        raise EnvelopeError(f'meta.image_format must be one of {sorted(IMAGE_FORMATS)}')
    shape = meta.get('image_shape')
    if not (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3
            and all(isinstance(s, int) and s > 0 for s in shape)):
        raise EnvelopeError(f'meta.image_shape must be [H, W, 3], got {shape!r}')


class EpisodeAssembler:
    """Reassembles episodes from step batches that may repeat (re-delivery after a restart).

    `add(batch)` returns the finished steps and instruction of every episode the batch closes
    (all steps 0..last present, last one with is_last). Steps already seen are ignored; episodes
    in `completed` (e.g. reloaded from the replay directory) are ignored entirely. At most
    `max_open` unfinished episodes are kept; beyond that the oldest is dropped and counted.
    """

    def __init__(self, completed: Optional[set] = None, max_open: int = 64):
        self.completed = set(completed or ())
        self.max_open = max_open
        self.dropped_open = 0
        self.duplicates = 0
        self._open: Dict[Tuple[str, int], Dict[int, StepRecord]] = {}
        self._instructions: Dict[Tuple[str, int], str] = {}

    def add(self, batch: StepBatch) -> List[Tuple[Tuple[str, int], str, List[StepRecord]]]:
        key = batch.key
        if key in self.completed:
            self.duplicates += len(batch.steps)
            return []
        steps = self._open.setdefault(key, {})
        self._instructions[key] = batch.instruction
        for record in batch.steps:
            if record.step in steps:
                self.duplicates += 1
            steps[record.step] = record
        self._evict()
        return self._close(key)

    def _close(self, key) -> List[Tuple[Tuple[str, int], str, List[StepRecord]]]:
        steps = self._open.get(key, {})
        last = [s.step for s in steps.values() if s.is_last]
        if not last or sorted(steps) != list(range(last[0] + 1)):
            return []
        del self._open[key]
        self.completed.add(key)
        return [(key, self._instructions.pop(key), [steps[i] for i in range(last[0] + 1)])]

    def _evict(self) -> None:
        while len(self._open) > self.max_open:
            oldest = next(iter(self._open))
            del self._open[oldest]
            self._instructions.pop(oldest, None)
            self.dropped_open += 1

    @property
    def open_steps(self) -> int:
        return sum(len(s) for s in self._open.values())
