"""Behaviour-cloning examples: every transition's frame, instruction and the next H actions.

Frames are stored once (uint8); a chunk is gathered by index. Chunks that run past the end of
their episode are padded with the episode's last action and masked out (mask 0), so the loss
never learns actions that were not taken and no transition is dropped.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence

import numpy as np

from robot_rl.types import ActionSpace, Episode


class ChunkBatch(NamedTuple):
    images: np.ndarray           # uint8 (B, h, w, 3)
    instructions: List[str]      # (B,)
    actions: np.ndarray          # float32 (B, H, 7), normalised
    mask: np.ndarray             # float32 (B, H): 1 where the step exists


class ChunkDataset:
    """All transitions of `episodes` as (frame, instruction, normalised action chunk) examples."""

    def __init__(self, episodes: Sequence[Episode], horizon: int, action_space: ActionSpace):
        if horizon < 1:
            raise ValueError(f'horizon must be >= 1, got {horizon}')
        episodes = [e for e in episodes if e.num_transitions > 0]
        if not episodes:
            raise ValueError('no episode with at least one transition to learn from')
        self.horizon = horizon
        self.action_space = action_space
        shapes = {e.images.shape[1:] for e in episodes}
        if len(shapes) != 1:
            raise ValueError(f'episodes hold frames of several sizes {sorted(shapes)}; set an '
                             'image_size to resize them on reading')
        # The last step of an Episode is padding (no action taken): transitions are 0..T-1.
        self.images = np.concatenate([e.images[:e.num_transitions] for e in episodes])
        self.actions = np.concatenate([action_space.normalise(e.actions[:e.num_transitions])
                                       for e in episodes]).astype(np.float32)
        self.instructions: List[str] = sorted({e.language_instruction for e in episodes})
        ids: Dict[str, int] = {text: i for i, text in enumerate(self.instructions)}
        self.instruction_ids = np.concatenate([
            np.full(e.num_transitions, ids[e.language_instruction], np.int32) for e in episodes])
        ends = np.cumsum([e.num_transitions for e in episodes])
        episode_end = np.repeat(ends, [e.num_transitions for e in episodes])  # exclusive
        steps = np.arange(len(self.actions))[:, None] + np.arange(horizon)[None]
        self.mask = (steps < episode_end[:, None]).astype(np.float32)
        self.chunk_index = np.minimum(steps, episode_end[:, None] - 1)

    def __len__(self) -> int:
        return len(self.actions)

    def get(self, rows: np.ndarray) -> ChunkBatch:
        rows = np.asarray(rows)
        return ChunkBatch(self.images[rows], [self.instructions[i] for i in
                                              self.instruction_ids[rows]],
                          self.actions[self.chunk_index[rows]], self.mask[rows])

    def sample(self, batch_size: int, rng: np.random.Generator) -> ChunkBatch:
        return self.get(rng.integers(0, len(self), batch_size))
