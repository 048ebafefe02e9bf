"""Replay of image transitions: uint8 frames stored once, episodes on disk, batch mixing.

Steps live in flat per-step arrays, each episode's N steps contiguous. Transition t of an episode
is (step t, step t + 1): its next observation is read at index t + 1, never stored twice, so a
stored step costs one frame plus a few small vectors. Only steps that are not the last of their
episode start a transition, so no transition crosses an episode boundary.

With a directory, every closed episode is first written to its own safetensors file (atomic:
temp file, fsync, rename) and only then enters memory; reopening the directory loads every
complete file again. Files cut short by a crash and stray temp files are skipped and reported in
`ReplayBuffer.dropped`. Nothing is pickled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
import re
from typing import (Any, Deque, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import safetensors
import safetensors.numpy

from robot_rl.data.returns import with_mc_returns
from robot_rl.types import ACTION_DIM, Episode, IMAGE_KEY, REWARD_STEP, STATE_DIM, STATE_KEY

logger = logging.getLogger(__name__)

FILE_FORMAT = 'robot_rl.episode/1'
_FILE_RE = re.compile(r'^episode_(\d+)\.safetensors(\.tmp)?$')
_FILE_ARRAYS = ('images', 'states', 'actions', 'rewards', 'discounts', 'is_first', 'is_last',
                'is_terminal')
# Per-step arrays besides images: name -> (shape of one step, dtype).
_STEP_ARRAYS = {
    'states': ((STATE_DIM,), np.float32),
    'actions': ((ACTION_DIM,), np.float32),
    'rewards': ((), np.float32),
    'discounts': ((), np.float32),
    'mc_returns': ((), np.float32),
    'is_terminal': ((), np.bool_),
    'has_next': ((), np.bool_),  # the step starts a transition (it is not its episode's last)
    'instruction_ids': ((), np.int32),
}
_COPIED_FIELDS = ('images', 'states', 'actions', 'rewards', 'discounts', 'mc_returns',
                  'is_terminal')


class TransitionBatch(NamedTuple):
    """B transitions (o_t, a_t, r_t, o_{t+1}) as numpy arrays.

    images:          uint8 (B, H, W, 3)  o_t's camera frame
    states:          float32 (B, 7)
    actions:         float32 (B, 7)      a_t
    rewards:         float32 (B,)        r_t
    next_images:     uint8 (B, H, W, 3)  o_{t+1}
    next_states:     float32 (B, 7)
    dones:           float32 (B,)        1 only when o_{t+1} is a true terminal; a time-limit
                                         truncation is 0, so its transition still bootstraps
    mc_returns:      float32 (B,)        Monte-Carlo return-to-go of (o_t, a_t), for Cal-QL
    instruction_ids: int64 (B,)          index into `instructions`
    instructions:    tuple of str        the vocabulary the ids index; ids are only meaningful
                                         with it (map strings, not ids, across batches)
    """

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_images: np.ndarray
    next_states: np.ndarray
    dones: np.ndarray
    mc_returns: np.ndarray
    instruction_ids: np.ndarray
    instructions: Tuple[str, ...]


# Batch field -> (per-step array it is read from, step offset from t).
_BATCH_SOURCES = {
    'images': ('images', 0), 'states': ('states', 0), 'actions': ('actions', 0),
    'rewards': ('rewards', 0), 'next_images': ('images', 1), 'next_states': ('states', 1),
    'mc_returns': ('mc_returns', 0),
}


class EpisodeBuilder:
    """Collects a streamed episode step by step and closes it into an `Episode`.

        builder = EpisodeBuilder('put the eggplant in the pot')
        obs, _ = env.reset()
        terminated = truncated = False
        while not (terminated or truncated):
            next_obs, reward, terminated, truncated, _ = env.step(action)
            builder.add_step(obs, action, reward)
            obs = next_obs
        buffer.add_episode(builder.finish(obs, terminal=terminated))

    The final step holds the last observation with a zero action and reward (padding). Every
    array is copied when added, so an environment may reuse its observation buffers.
    """

    def __init__(self, language_instruction: str, metadata: Optional[Mapping[str, Any]] = None):
        self.language_instruction = language_instruction
        self.metadata = dict(metadata or {})
        self._steps: List[Tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add_step(self, observation: Mapping[str, np.ndarray], action, reward: float) -> None:
        """Append step t: observation {'image_primary', 'state'}, action (7,), reward r_t."""
        image = np.array(observation[IMAGE_KEY])
        if self._steps and image.shape != self._steps[0][0].shape:
            raise ValueError(f'step {len(self._steps)}: image shape {image.shape} differs from '
                             f'that of step 0, {self._steps[0][0].shape}')
        self._steps.append((image, np.array(observation[STATE_KEY], np.float32),
                            np.array(action, np.float32), float(reward)))

    def finish(self, final_observation: Mapping[str, np.ndarray], terminal: bool) -> Episode:
        """Close the episode; `terminal` = task ended (success), False = time-limit truncation."""
        if not self._steps:
            raise ValueError('EpisodeBuilder.finish: no steps were added')
        images, states, actions, rewards = zip(*self._steps)
        n = len(self._steps) + 1
        is_terminal = np.zeros(n, bool)
        is_terminal[-1] = terminal
        episode = Episode(
            images=np.stack(images + (np.asarray(final_observation[IMAGE_KEY]),)),
            states=np.stack(states + (np.asarray(final_observation[STATE_KEY], np.float32),)),
            actions=np.concatenate([np.stack(actions), np.zeros((1, ACTION_DIM), np.float32)]),
            rewards=np.array(rewards + (0.0,), np.float32),
            discounts=np.where(is_terminal, 0.0, 1.0).astype(np.float32),  # dm_env convention
            is_first=np.arange(n) == 0, is_last=np.arange(n) == n - 1, is_terminal=is_terminal,
            language_instruction=self.language_instruction, metadata=dict(self.metadata))
        episode.validate()
        self._steps = []
        return episode


# ---------------------------------------------------------------------------- episode files

def write_episode(path: Union[str, Path], episode: Episode) -> None:
    """Write `episode` to one safetensors file atomically (temp file + fsync + rename).

    Arrays: images, states, actions, rewards, discounts, is_first, is_last, is_terminal.
    Header metadata: format, language_instruction, metadata (JSON), checksum (sha256 over the
    arrays and both strings). mc_returns are not stored: they depend on the reader's gamma.
    """
    path = Path(path)
    arrays = {name: np.ascontiguousarray(getattr(episode, name)) for name in _FILE_ARRAYS}
    try:
        meta_json = json.dumps(episode.metadata, sort_keys=True)
    except TypeError as err:
        raise ValueError(f'episode metadata is not JSON-serialisable: {err}') from None
    header = {'format': FILE_FORMAT, 'language_instruction': episode.language_instruction,
              'metadata': meta_json,
              'checksum': _checksum(arrays, episode.language_instruction, meta_json)}
    temp = path.with_name(path.name + '.tmp')
    with open(temp, 'wb') as f:
        f.write(safetensors.numpy.save(arrays, metadata=header))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_directory(path.parent)


def read_episode(path: Union[str, Path]) -> Episode:
    """Read a `write_episode` file; ValueError if it is cut short, corrupt or foreign."""
    data = Path(path).read_bytes()
    try:
        arrays = safetensors.numpy.load(data)
    except safetensors.SafetensorError as err:
        raise ValueError(f'unreadable safetensors file ({err})') from None
    # load() has validated the layout: 8-byte little-endian header length, then JSON.
    header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')]).get('__metadata__', {})
    found = header.get('format')
    if found != FILE_FORMAT:
        raise ValueError(f'not a {FILE_FORMAT} file (format {found!r})')
    missing = set(_FILE_ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f'missing arrays {sorted(missing)}')
    missing = {'language_instruction', 'metadata', 'checksum'} - set(header)
    if missing:
        raise ValueError(f'header metadata lacks {sorted(missing)}')
    instruction, meta_json = header['language_instruction'], header['metadata']
    if _checksum(arrays, instruction, meta_json) != header['checksum']:
        raise ValueError('checksum mismatch')
    episode = Episode(**{name: arrays[name] for name in _FILE_ARRAYS},
                      language_instruction=instruction, metadata=json.loads(meta_json))
    return episode.validate()


def _checksum(arrays: Mapping[str, np.ndarray], instruction: str, meta_json: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f'{name}:{arrays[name].dtype.str}:{arrays[name].shape};'.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    digest.update(instruction.encode())
    digest.update(meta_json.encode())
    return digest.hexdigest()


def _episode_files(directory: Path) -> List[Tuple[int, bool, Path]]:
    """(sequence number, is a temp file, path) of the episode files in `directory`, in order."""
    found = []
    for path in directory.iterdir():
        match = _FILE_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), bool(match.group(2)), path))
    return sorted(found)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is flushed.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- replay buffer

@dataclasses.dataclass
class _Slot:
    """Where one stored episode lives: steps [start, start + length) of the per-step arrays."""

    start: int
    length: int
    instruction: str
    metadata: Dict[str, Any]

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.start < hi and lo < self.start + self.length


class ReplayBuffer:
    """Episodes of image transitions, sampled uniformly over transitions.

    directory:      None = memory only; else one `episode_<seq>.safetensors` per closed episode
                    (append-only: evicting from memory never deletes a file). An existing
                    directory is loaded at construction; see `dropped`.
    capacity:       max steps held in memory (None = unbounded); adding past it evicts whole
                    oldest episodes (FIFO). Steps live in a ring: an episode that does not fit
                    before the end starts again at slot 0, and every older episode in the swept
                    range is evicted, so up to one episode's length at the end can sit unused.
    gamma, failure_reward: Monte-Carlo returns, computed when an episode is added.
    chunk_steps:    without a capacity, storage grows by doubling, rounded up to whole chunks;
                    with one, all its rows are reserved at the first episode. Either way the
                    arrays are zero-mapped, so memory is backed only as steps are written.

    Not thread-safe: guard `add_episode` and `sample` with one lock if used from two threads.
    """

    def __init__(self, directory: Union[str, Path, None] = None, *,
                 capacity: Optional[int] = None, gamma: float = 0.99,
                 failure_reward: float = REWARD_STEP, chunk_steps: int = 4096):
        if capacity is not None and capacity < 2:
            raise ValueError(f'capacity must be at least 2 steps, got {capacity}')
        if chunk_steps < 1:
            raise ValueError(f'chunk_steps must be positive, got {chunk_steps}')
        self.capacity, self.gamma, self.failure_reward = capacity, gamma, failure_reward
        self.directory = None if directory is None else Path(directory)
        self.dropped: List[Tuple[str, str]] = []
        """(path, reason) of every file skipped while loading the directory."""
        self._chunk = chunk_steps
        self._arrays: Dict[str, np.ndarray] = {}
        self._slots: Deque[_Slot] = collections.deque()
        self._instructions: List[str] = []
        self._instruction_index: Dict[str, int] = {}
        self._head = 0            # where the next episode goes
        self._num_steps = 0
        self._next_seq = 0        # number of the next episode file
        self._starts: Optional[np.ndarray] = None   # cached transition start indices
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_directory()

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        """Number of episodes held in memory."""
        return len(self._slots)

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def num_transitions(self) -> int:
        return self._num_steps - len(self._slots)

    @property
    def instructions(self) -> Tuple[str, ...]:
        """Vocabulary that `TransitionBatch.instruction_ids` index (grows, never reorders)."""
        return tuple(self._instructions)

    @property
    def image_shape(self) -> Optional[Tuple[int, ...]]:
        """(H, W, 3) of every stored frame; None until the first episode."""
        return self._arrays['images'].shape[1:] if self._arrays else None

    @property
    def nbytes(self) -> Dict[str, int]:
        """Reserved bytes of each per-step array, keyed by field ('images', 'states', ...)."""
        return {name: int(arr.nbytes) for name, arr in self._arrays.items()}

    def add_episode(self, episode: Episode) -> Episode:
        """Store one closed episode (on disk first when backed); return it with mc_returns.

        Raises ValueError naming the episode and field for wrong shapes or dtypes, a frame size
        other than the buffer's, non-finite values, or more steps than the capacity.
        """
        label = f'episode {self._next_seq} ({episode.language_instruction!r})'
        self._check(episode, label)
        episode = with_mc_returns(episode, self.gamma, self.failure_reward)
        if self.directory is not None:
            write_episode(self.directory / f'episode_{self._next_seq:09d}.safetensors', episode)
        self._next_seq += 1
        self._insert(episode)
        return episode

    def episodes(self) -> Iterator[Episode]:
        """Copies of the episodes held in memory, oldest first (with mc_returns)."""
        for slot in self._slots:
            steps = slice(slot.start, slot.start + slot.length)
            fields = {name: self._arrays[name][steps].copy() for name in _COPIED_FIELDS}
            index = np.arange(slot.length)
            yield Episode(**fields, is_first=index == 0, is_last=index == slot.length - 1,
                          language_instruction=slot.instruction, metadata=dict(slot.metadata))

    def sample(self, batch_size: int, rng: np.random.Generator,
               out: Optional[TransitionBatch] = None) -> TransitionBatch:
        """`batch_size` transitions drawn uniformly (with replacement) using `rng`.

        out: an earlier batch of the same size whose arrays are overwritten instead of fresh
        ones allocated (saves page-faulting 2 * B frames per call; the caller must be done
        with its contents).
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        return _gather([(self, self._draw(batch_size, rng))], out)

    def _draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Storage indices of `count` transition starts, uniform over transitions."""
        if self._starts is None:
            self._starts = np.flatnonzero(self._arrays.get('has_next', np.zeros(0, bool)))
        if self._starts.size == 0:
            raise ValueError('replay buffer holds no transitions')
        return self._starts[rng.integers(self._starts.size, size=count)]

    # ------------------------------------------------------------------ checks and loading

    def _check(self, episode: Episode, label: str) -> None:
        try:
            episode.validate()
        except ValueError as err:
            raise ValueError(f'{label}: {err}') from None
        shape = self.image_shape
        if shape is not None and episode.images.shape[1:] != shape:
            raise ValueError(f'{label}: images are {episode.images.shape[1:]}, the buffer holds '
                             f'{shape}')
        for name in ('states', 'actions', 'rewards', 'discounts'):
            bad = np.flatnonzero(~np.isfinite(getattr(episode, name)).reshape(len(episode), -1)
                                 .all(axis=1))
            if bad.size:
                raise ValueError(f'{label}: {name} is not finite at step {bad[0]}')
        if self.capacity is not None and len(episode) > self.capacity:
            raise ValueError(f'{label}: {len(episode)} steps exceed the capacity '
                             f'{self.capacity}')

    def _load_directory(self) -> None:
        for seq, is_temp, path in _episode_files(self.directory):
            self._next_seq = max(self._next_seq, seq + 1)
            if is_temp:
                self._drop(path, 'temporary file of an interrupted write')
                continue
            try:
                episode = read_episode(path)
                self._check(episode, str(path))
            except (ValueError, OSError) as err:
                self._drop(path, str(err))
                continue
            self._insert(with_mc_returns(episode, self.gamma, self.failure_reward))

    def _drop(self, path: Path, reason: str) -> None:
        logger.warning('replay: skipping %s: %s', path, reason)
        self.dropped.append((str(path), reason))

    # ------------------------------------------------------------------ storage

    def _insert(self, episode: Episode) -> None:
        if not self._arrays:
            self._allocate(episode.images.shape[1:])
        n = len(episode)
        start = self._place(n)
        steps = slice(start, start + n)
        for name in _COPIED_FIELDS:
            self._arrays[name][steps] = getattr(episode, name)
        self._arrays['has_next'][steps] = np.arange(n) < n - 1
        self._arrays['instruction_ids'][steps] = self._instruction_id(episode.language_instruction)
        self._slots.append(_Slot(start, n, episode.language_instruction, dict(episode.metadata)))
        self._num_steps += n
        self._starts = None

    def _allocate(self, image_shape: Tuple[int, ...]) -> None:
        self._arrays = {'images': np.zeros((0,) + tuple(image_shape), np.uint8)}
        for name, (shape, dtype) in _STEP_ARRAYS.items():
            self._arrays[name] = np.zeros((0,) + shape, dtype)

    def _place(self, n: int) -> int:
        """Start index for n new steps; evicts the oldest episodes the write sweeps over."""
        start = self._head
        wrapped = self.capacity is not None and start + n > self.capacity
        if wrapped:
            start = 0
        swept = [(start, start + n)] + ([(self._head, self.capacity)] if wrapped else [])
        # Episodes lie in ring order after the head, oldest first: the swept ones are a prefix.
        while self._slots and any(self._slots[0].overlaps(lo, hi) for lo, hi in swept):
            self._evict_oldest()
        self._reserve(start + n)
        self._head = start + n
        return start

    def _evict_oldest(self) -> None:
        slot = self._slots.popleft()
        self._arrays['has_next'][slot.start:slot.start + slot.length] = False
        self._num_steps -= slot.length
        self._starts = None

    def _reserve(self, end: int) -> None:
        size = len(self._arrays['images'])
        if end <= size:
            return
        if self.capacity is not None:
            grown = self.capacity  # once: no copies as the buffer fills
        else:
            grown = -(-max(end, 2 * size) // self._chunk) * self._chunk
        for name, arr in self._arrays.items():
            # np.zeros maps lazily: rows cost memory only once written.
            bigger = np.zeros((grown,) + arr.shape[1:], arr.dtype)
            bigger[:size] = arr
            self._arrays[name] = bigger

    def _instruction_id(self, instruction: str) -> int:
        if instruction not in self._instruction_index:
            self._instruction_index[instruction] = len(self._instructions)
            self._instructions.append(instruction)
        return self._instruction_index[instruction]


# ---------------------------------------------------------------------------- mixing sources

class MixedSampler:
    """Draws each batch from several buffers in fixed proportions (e.g. 50/50 offline/online).

    sources: (buffer, weight) pairs; weights are positive and need not sum to 1.
    Counts per batch are exact: each non-empty source gets floor(B * w) rows, and the rows left
    over go one each to the sources with the largest remainders (ties: the earlier source), so
    256 at 0.5/0.5 is 128/128 and 10 at 1/1/1 is 4/3/3. A source with no transitions contributes
    nothing and the others share its weight in proportion. Rows come in source order;
    instruction ids are remapped onto one vocabulary (sources in order, first seen first).
    """

    def __init__(self, sources: Sequence[Tuple[ReplayBuffer, float]]):
        if not sources:
            raise ValueError('MixedSampler needs at least one source')
        for i, (_, weight) in enumerate(sources):
            if not np.isfinite(weight) or weight <= 0:
                raise ValueError(f'source {i}: weight must be positive and finite, got {weight}')
        self.sources = [(buffer, float(weight)) for buffer, weight in sources]

    def counts(self, batch_size: int) -> List[int]:
        """Rows each source contributes to a batch of `batch_size` (0 for empty sources)."""
        weights = np.array([w if buf.num_transitions > 0 else 0.0 for buf, w in self.sources])
        if weights.sum() == 0:
            raise ValueError('every source of the MixedSampler is empty')
        exact = batch_size * weights / weights.sum()
        counts = np.floor(exact).astype(int)
        leftover = batch_size - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind='stable')[:leftover]] += 1
        return counts.tolist()

    def sample(self, batch_size: int, rng: np.random.Generator,
               out: Optional[TransitionBatch] = None) -> TransitionBatch:
        """One batch of `batch_size` rows, `counts(batch_size)` from each source in order.

        out: as in `ReplayBuffer.sample`, an earlier batch to overwrite.
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        parts = [(buffer, buffer._draw(count, rng))
                 for (buffer, _), count in zip(self.sources, self.counts(batch_size)) if count]
        return _gather(parts, out)


def _gather(parts: Sequence[Tuple[ReplayBuffer, np.ndarray]],
            out: Optional[TransitionBatch] = None) -> TransitionBatch:
    """One batch from (buffer, transition start indices) parts, rows in part order.

    Rows are written straight into the output (no per-source batch to concatenate), and
    instruction ids are remapped onto one vocabulary: the parts' instructions, first seen first.
    """
    shapes = {buffer.image_shape for buffer, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f'cannot mix buffers with different image sizes: {sorted(shapes)}')
    arrays = _batch_arrays(sum(len(now) for _, now in parts), parts[0][0]._arrays, out)
    vocabulary: Dict[str, int] = {}
    row = 0
    for buffer, now in parts:
        _write_rows(arrays, slice(row, row + len(now)), buffer, now, vocabulary)
        row += len(now)
    return TransitionBatch(**arrays, instructions=tuple(vocabulary))


def _batch_arrays(size: int, layout: Mapping[str, np.ndarray],
                  out: Optional[TransitionBatch]) -> Dict[str, np.ndarray]:
    """The batch's arrays by field: fresh, or those of `out` once their shapes are checked."""
    expected = {field: ((size,) + layout[name].shape[1:], layout[name].dtype)
                for field, (name, _) in _BATCH_SOURCES.items()}
    expected.update(dones=((size,), np.dtype(np.float32)),
                    instruction_ids=((size,), np.dtype(np.int64)))
    if out is None:
        return {field: np.empty(shape, dtype) for field, (shape, dtype) in expected.items()}
    for field, (shape, dtype) in expected.items():
        array = getattr(out, field)
        if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
            raise ValueError(f'out.{field} is {array.dtype} {array.shape}, expected a '
                             f'contiguous {dtype} {shape}')
    return {field: getattr(out, field) for field in expected}


def _write_rows(out: Dict[str, np.ndarray], rows: slice, buffer: ReplayBuffer, now: np.ndarray,
                vocabulary: Dict[str, int]) -> None:
    """Fill out[field][rows] with the transitions starting at storage indices `now`."""
    arrays = buffer._arrays
    for field, (name, offset) in _BATCH_SOURCES.items():
        # mode='clip' (indices are valid anyway) lets take write into `out` unbuffered.
        np.take(arrays[name], now + offset, axis=0, out=out[field][rows], mode='clip')
    out['dones'][rows] = arrays['is_terminal'][now + 1]
    lookup = np.array([vocabulary.setdefault(text, len(vocabulary))
                       for text in buffer.instructions], np.int64)
    out['instruction_ids'][rows] = lookup[arrays['instruction_ids'][now]]
