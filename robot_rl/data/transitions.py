"""Cal-QL transitions streamed from RLDS, for mixtures too large for the in-memory replay.

    sources = [TransitionSource('bridge', '<dir>/bridge_dataset/1.0.0', labelling='vgps'),
               TransitionSource('fractal', '<dir>/fractal20220817_data/0.1.0',
                                layout='fractal', weight=0.54, labelling='vgps')]
    ds = transition_dataset(sources, batch_size=256, gamma=0.98, action_space=space,
                            image_size=(128, 128), seed=0, shard=(rank, world_size))
    for batch in transition_batches(ds): ...     # replay.TransitionBatch, as MixedSampler's

Per source (rlds.episode_stream reads each record once, images still encoded):
  1. label the episode: per-transition rewards and done flags under the source's labelling
     (label_transitions), Monte-Carlo returns with the failed-trajectory rule
     (returns.monte_carlo_returns) and actions clipped and normalised by the run's ActionSpace,
     all by the numpy functions the replay path uses, once per episode (tf.numpy_function);
  2. pair step t with step t + 1: an N-step episode gives N - 1 transitions, exactly those a
     ReplayBuffer stores. The last step starts none (its action and reward are padding);
     done = is_terminal[t + 1], so the last transition of a terminal episode is done and that
     of a truncated episode is not (it bootstraps from the final observation, as in replay);
  3. shuffle transitions over `shuffle_buffer` (frames still encoded: the buffer holds JPEG
     bytes, not pixels), then decode and resize o_t and o_{t+1} in parallel (AUTOTUNE).
Sources are then interleaved by weight, batched and prefetched (oxe.interleave). Every frame
is decoded twice (as o_t and as o_{t+1}); decoding per episode instead would halve that but
hold decoded pixels in the shuffle buffer (12 KB per 64x64 frame pair, 98 KB at 128x128).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from robot_rl.data import oxe, rlds
from robot_rl.data.bridge_spec import import_tf
from robot_rl.data.replay import TransitionBatch
from robot_rl.data.returns import monte_carlo_returns
from robot_rl.types import ACTION_DIM, ActionSpace, IMAGE_KEY, REWARD_STEP, REWARD_SUCCESS, \
    STATE_DIM, STATE_KEY

LABELLINGS = ('dataset', 'vgps')
"""'dataset': the stored rewards and is_terminal (our simulated data); 'vgps': every episode is
a successful demonstration (V-GPS relabelling of Bridge/OXE data)."""
VGPS_SUCCESS_STEPS = 3
"""V-GPS: the last this many transitions of a demonstration earn the success reward."""

_PY_ERROR = re.compile(r'ValueError: (.*)')
NEXT_IMAGE_KEY = f'next_{IMAGE_KEY}'
NEXT_STATE_KEY = f'next_{STATE_KEY}'
# Keys of one transition element of the tf.data pipeline (before batching).
TRANSITION_KEYS = (IMAGE_KEY, NEXT_IMAGE_KEY, STATE_KEY, NEXT_STATE_KEY, 'action', 'reward',
                   'done', 'mc_return', 'language_instruction', oxe.DATASET_INDEX_KEY)


# ----------------------------------------------------------------------------- labelling

def vgps_first_success(num_transitions: int, success_steps: int = VGPS_SUCCESS_STEPS) -> int:
    """Index of the first transition V-GPS labels a success (reward 0, terminal)."""
    return max(num_transitions - success_steps, 0)


def label_transitions(rewards: np.ndarray, is_terminal: np.ndarray, labelling: str
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(rewards, dones) float32 (N - 1,) of an N-step episode's transitions under `labelling`.

    'dataset': reward r_t = rewards[t], done_t = is_terminal[t + 1] (what ReplayBuffer reads).
    'vgps': REWARD_STEP and not done before vgps_first_success, REWARD_SUCCESS and done from
    there on: the transitions, rewards and dones of robot_rl.rl.learner.label_vgps's parts.
    """
    count = len(rewards) - 1
    if labelling == 'dataset':
        return (np.asarray(rewards[:-1], np.float32),
                np.asarray(is_terminal[1:], bool).astype(np.float32))
    if labelling == 'vgps':
        success = np.arange(count) >= vgps_first_success(count)
        return (np.where(success, REWARD_SUCCESS, REWARD_STEP).astype(np.float32),
                success.astype(np.float32))
    raise ValueError(f'labelling must be one of {LABELLINGS}, got {labelling!r}')


def episode_transitions(columns: Dict[str, np.ndarray], labelling: str, gamma: float,
                        action_space: ActionSpace, label: str
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One episode's (actions (T, 7) normalised, rewards, dones, mc_returns (T,)), T = N - 1.

    columns: the episode's 'action', STATE_KEY, 'reward', 'discount', 'is_first', 'is_last',
    'is_terminal' (N, ...). The checks the replay path makes before storing an episode raise
    ValueError naming `label`: fewer than 2 steps, flags off their places, non-finite values.
    """
    n = len(columns['reward'])
    if n < 2:
        raise ValueError(f'{label}: an episode needs at least 2 steps, one has {n}')
    flags = {'is_first': 0, 'is_last': n - 1}
    for key, place in flags.items():
        if not np.array_equal(np.flatnonzero(columns[key]), [place]):
            raise ValueError(f'{label}: {key} must be set on step {place} only, is on steps '
                             f'{np.flatnonzero(columns[key]).tolist()}')
    if np.any(columns['is_terminal'][:-1]):
        raise ValueError(f'{label}: is_terminal is set before the last step (at step '
                         f'{int(np.flatnonzero(columns["is_terminal"])[0])})')
    for key in ('reward', 'discount', 'action', STATE_KEY):
        values = np.asarray(columns[key]).reshape(n, -1)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            raise ValueError(f'{label}: {key} is not finite at step {bad[0]} '
                             f'({values[bad[0]]}); fix or drop this episode')
    rewards, dones = label_transitions(columns['reward'], columns['is_terminal'], labelling)
    returns = monte_carlo_returns(rewards, dones.astype(bool), gamma)
    if not np.isfinite(returns).all():
        raise ValueError(f'{label}: a Monte-Carlo return overflows')
    actions = action_space.normalise(action_space.clip(columns['action'][:-1]))
    return actions, rewards, dones, returns


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class TransitionSource(oxe.OxeSource):
    """One dataset of a transition mixture: an OxeSource and how its rewards are labelled."""

    labelling: str = 'dataset'
    """One of LABELLINGS."""

    def __post_init__(self):
        super().__post_init__()
        if self.labelling not in LABELLINGS:
            raise ValueError(f'TransitionSource {self.key!r}: labelling must be one of '
                             f'{LABELLINGS}, got {self.labelling!r}')


def transition_dataset(sources: Sequence[TransitionSource], *, batch_size: int, gamma: float,
                       action_space: ActionSpace,
                       image_size: Optional[Tuple[int, int]] = None,
                       shuffle_buffer: int = 10_000, seed: Optional[int] = None,
                       shard: Tuple[int, int] = (0, 1), max_episodes: Optional[int] = None,
                       repeat: bool = True, num_threads: Optional[int] = None,
                       drop_remainder: bool = True):
    """tf.data of transition batches mixed from `sources` by weight (see the module docstring).

    Each batch (B = batch_size): IMAGE_KEY and NEXT_IMAGE_KEY uint8 (B, H, W, 3), STATE_KEY and
    NEXT_STATE_KEY float32 (B, 7), 'action' float32 (B, 7) in [-1, 1], 'reward', 'done',
    'mc_return' float32 (B,), 'language_instruction' string (B,), DATASET_INDEX_KEY int32 (B,).
    shuffle_buffer: transitions per source (0: file order, shard files unshuffled too).
    shard (index, count): this reader's disjoint part of every source (rlds.episode_stream);
    max_episodes: only each source's first max_episodes records are split into the shards.
    repeat: every source repeats forever (False: one pass, for checks).
    Bad data raises ValueError naming the source while iterating (transition_batches).
    """
    tf, _ = import_tf()
    oxe.check_keys(sources)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f'gamma must be in [0, 1), got {gamma}')
    size = None if image_size is None else tuple(int(s) for s in image_size)
    streams = [_source_stream(index, source, size, gamma, action_space, shuffle_buffer,
                              None if seed is None else seed + index, shard, max_episodes,
                              repeat)
               for index, source in enumerate(sources)]
    return oxe.interleave(sources, streams, batch_size=batch_size, seed=seed,
                          num_threads=num_threads, drop_remainder=drop_remainder)


def _source_stream(index: int, source: TransitionSource, image_size, gamma: float,
                   action_space: ActionSpace, shuffle_buffer: int, seed: Optional[int],
                   shard: Tuple[int, int], max_episodes: Optional[int], repeat: bool):
    """One source's unbatched, decoded transitions (TRANSITION_KEYS)."""
    tf, _ = import_tf()
    shuffle = shuffle_buffer > 0
    episodes, decode = rlds.episode_stream(
        source.path, source.split, image_size=image_size, shuffle=shuffle, seed=seed,
        layout=source.layout, shard=shard, limit=max_episodes)
    if repeat:
        episodes = episodes.repeat()
    label = f'{source.path} [{source.split}] ({source.key!r}, labelling {source.labelling!r})'
    label_fn = functools.partial(_label_arrays, labelling=source.labelling, gamma=gamma,
                                 action_space=action_space, label=label)

    def to_transitions(columns: Dict[str, Any]) -> Dict[str, Any]:
        keys = ('action', STATE_KEY, 'reward', 'discount', 'is_first', 'is_last', 'is_terminal')
        actions, rewards, dones, returns = tf.numpy_function(
            label_fn, [columns[k] for k in keys], [tf.float32] * 4, stateful=False)
        count = tf.shape(columns['reward'])[0] - 1
        states = columns[STATE_KEY]
        return {
            IMAGE_KEY: columns[IMAGE_KEY][:-1], NEXT_IMAGE_KEY: columns[IMAGE_KEY][1:],
            STATE_KEY: states[:-1], NEXT_STATE_KEY: states[1:],
            'action': tf.ensure_shape(actions, [None, ACTION_DIM]),
            'reward': tf.ensure_shape(rewards, [None]), 'done': tf.ensure_shape(dones, [None]),
            'mc_return': tf.ensure_shape(returns, [None]),
            # One instruction per episode, step 0's, as Episode.language_instruction.
            'language_instruction': tf.fill([count], columns['language_instruction'][0]),
            oxe.DATASET_INDEX_KEY: tf.fill([count], tf.constant(index, tf.int32)),
        }

    deterministic = seed is not None or not shuffle
    ds = rlds._map(episodes, to_transitions, num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=deterministic).unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)

    def decode_pair(transition: Dict[str, Any]) -> Dict[str, Any]:
        return {**transition, IMAGE_KEY: decode(transition[IMAGE_KEY]),
                NEXT_IMAGE_KEY: decode(transition[NEXT_IMAGE_KEY]),
                STATE_KEY: tf.ensure_shape(transition[STATE_KEY], [STATE_DIM]),
                NEXT_STATE_KEY: tf.ensure_shape(transition[NEXT_STATE_KEY], [STATE_DIM])}

    return rlds._map(ds, decode_pair, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=deterministic)


def _label_arrays(actions, states, rewards, discounts, is_first, is_last, is_terminal, *,
                  labelling: str, gamma: float, action_space: ActionSpace, label: str):
    """episode_transitions on tf.numpy_function's positional arrays."""
    columns = {'action': actions, STATE_KEY: states, 'reward': rewards, 'discount': discounts,
               'is_first': is_first, 'is_last': is_last, 'is_terminal': is_terminal}
    return episode_transitions(columns, labelling, gamma, action_space, label)


# ----------------------------------------------------------------------------- batches


def transition_batches(ds, source: str = 'transitions') -> Iterator[TransitionBatch]:
    """transition_dataset's batches as replay.TransitionBatch (writable numpy arrays), the
    batches MixedSampler gives; instruction ids index the batch's sorted instructions.
    Read and labelling errors raise ValueError naming `source` and the dataset."""
    batches = rlds.numpy_batches(ds, source)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ValueError as err:
            # A labelling error crosses tf.numpy_function as text with a Python traceback:
            # keep its own message.
            found = _PY_ERROR.search(str(err))
            if found is None:
                raise
            raise ValueError(f'{source}: {found.group(1)}') from err
        instructions, ids = np.unique(batch['language_instruction'], return_inverse=True)
        yield TransitionBatch(
            images=batch[IMAGE_KEY], states=batch[STATE_KEY], actions=batch['action'],
            rewards=batch['reward'], next_images=batch[NEXT_IMAGE_KEY],
            next_states=batch[NEXT_STATE_KEY], dones=batch['done'],
            mc_returns=batch['mc_return'], instruction_ids=ids.reshape(-1).astype(np.int64),
            instructions=tuple(str(s) for s in instructions))
