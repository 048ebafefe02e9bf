"""'octo': Octo (Octo Model Team, 2024), a JAX generalist, behind the Policy protocol.

JAX and Octo are imported only when an OctoPolicy is built: importing `policies` never imports
them, and without them building one is an ImportError that says how to install them. The
adapter uses Octo's documented API (octo/model/octo_model.py):

    model = OctoModel.load_pretrained('hf://rail-berkeley/octo-small-1.5')
    tasks = model.create_tasks(texts=[instruction])
    actions = model.sample_actions(observations, tasks, rng=key, sample_shape=(K,),
        unnormalization_statistics=model.dataset_statistics[dataset_key]['action'])
    # -> (K, batch, action_horizon, action_dim), un-normalised: where(mask, a * std + mean, a)

Observations are {'image_primary': uint8 (1, W, h, w, 3), 'timestep_pad_mask': bool (1, W)}: a
history window of the last W frames, W and (h, w) read from the checkpoint's example batch.
Like Octo's HistoryWrapper, the window starts as copies of the episode's first frame marked as
padding. Each `sample_actions` call is one control step and adds its frame to the window, so call
it once per step (V-GPS does) and `reset` between episodes.

Octo, like Open X-Embodiment data, uses gripper 1 = open, 0 = closed, as this project does; the
gripper (not normalised: mask False) is clipped into [0, 1]. Octo is not trainable from here
(its fine-tuning is JAX): it is a Policy for V-GPS steering, not a TrainablePolicy.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from policies.base import check_action_chunks, dataset_action_stats, register_policy
from robot_rl.types import ACTION_DIM, fit_image, IMAGE_KEY, Observation

DEFAULT_CHECKPOINT = 'hf://rail-berkeley/octo-small-1.5'
DEFAULT_DATASET_KEY = 'bridge_dataset'
"""Octo's name for BridgeData V2 in its checkpoints' dataset statistics."""
INSTALL_HINT = ('the octo policy needs Octo and JAX, which are not installed: pip install '
                '"octo @ git+https://github.com/octo-models/octo.git" and a JAX build for your '
                'accelerator (e.g. pip install "jax[cuda12]"); see the README section on Octo')
PAD_KEYS = ('timestep_pad_mask', 'pad_mask')
"""The window's padding mask in the example batch: Octo 1.5's name, then older checkpoints'."""
GRIPPER = ACTION_DIM - 1


def import_octo() -> Tuple[Any, Any]:
    """(jax, OctoModel), or an ImportError that says how to install them."""
    try:
        import jax
        from octo.model.octo_model import OctoModel
    except ImportError as err:
        raise ImportError(f'{INSTALL_HINT} ({err})') from err
    return jax, OctoModel


class JaxKeys:
    """A fresh JAX PRNG key per call, split from one seeded key."""

    def __init__(self, seed: int = 0):
        jax, _ = import_octo()
        self.random = jax.random
        self.key = jax.random.PRNGKey(seed)

    def __call__(self):
        self.key, key = self.random.split(self.key)
        return key


def octo_action_stats(dataset_statistics: Optional[Mapping[str, Any]], dataset_key: str,
                      source: str = 'the checkpoint') -> Dict[str, np.ndarray]:
    """{'mean', 'std'} float32 and 'mask' (7,) of `dataset_key` in an Octo checkpoint's
    statistics (checked by policies.base.dataset_action_stats)."""
    stats = dataset_action_stats(dataset_statistics or {}, dataset_key, ('mean', 'std'), source)
    return {name: value.astype(np.float32) if name != 'mask' else value
            for name, value in stats.items()}


def action_horizon(config: Mapping[str, Any]) -> int:
    """H of an Octo checkpoint: its action head's action_horizon (older configs: pred_horizon)."""
    try:
        kwargs = config['model']['heads']['action']['kwargs']
    except (KeyError, TypeError):
        raise ValueError('the Octo checkpoint config has no model.heads.action.kwargs') from None
    for name in ('action_horizon', 'pred_horizon'):
        if name in kwargs:
            return int(kwargs[name])
    raise ValueError('the Octo checkpoint config names no action_horizon for its action head')


@register_policy('octo')
class OctoPolicy:
    """Octo's `sample_actions` with a sample shape of K, one history window per episode.

    Args:
        checkpoint: Octo checkpoint path or 'hf://<repo>' (OctoModel.load_pretrained).
        dataset_key: the dataset whose statistics un-normalise actions.
        seed: seed of the JAX PRNG key sequence.
        window: history frames to use, 1..the checkpoint's window (default: all of it).
        model: an already-loaded OctoModel instead of `checkpoint`.
        keys: callable returning a fresh PRNG key per call (default: JaxKeys(seed)).
    """

    name = 'octo'

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT,
                 dataset_key: str = DEFAULT_DATASET_KEY, *, seed: int = 0,
                 window: Optional[int] = None, model: Any = None,
                 keys: Optional[Callable[[], Any]] = None):
        source = 'the given Octo model' if model is not None else checkpoint
        if model is None:
            _, octo_model = import_octo()
            model = octo_model.load_pretrained(checkpoint)
        self.model = model
        self.unnormalization = octo_action_stats(model.dataset_statistics, dataset_key, source)
        self.dataset_key = dataset_key
        self.action_horizon = action_horizon(model.config)
        example = model.example_batch['observation']
        if IMAGE_KEY not in example:
            raise ValueError(f'{source} was not trained on {IMAGE_KEY!r} observations; its '
                             f'example batch has {sorted(example)}')
        pad_key = next((k for k in PAD_KEYS if k in example), None)
        if pad_key is None:
            raise ValueError(f'{source}: the example batch has none of {PAD_KEYS}')
        model_window = int(np.shape(example[pad_key])[1])
        self.window = model_window if window is None else int(window)
        if not 1 <= self.window <= model_window:
            raise ValueError(f'window must be in 1..{model_window} (the checkpoint window), '
                             f'got {window}')
        self.image_size = tuple(int(s) for s in np.shape(example[IMAGE_KEY])[2:4])
        self.keys = keys if keys is not None else JaxKeys(seed)
        self.history: collections.deque = collections.deque(maxlen=self.window)
        self.steps = 0
        self.tasks: Dict[str, Any] = {}

    def reset(self, seed: Optional[int] = None) -> None:
        """A new episode: the history window starts over.

        A seed restarts the default key sequence; a key source given at construction is the
        caller's to seed.
        """
        if seed is not None and isinstance(self.keys, JaxKeys):
            self.keys = JaxKeys(seed)
        self.history.clear()
        self.steps = 0

    def observe(self, obs: Observation) -> Dict[str, np.ndarray]:
        """Add this step's frame; Octo's observations for the window ending with it.

        image_primary uint8 (1, W, h, w, 3); timestep_pad_mask bool (1, W), False for the
        copies of the first frame that fill a window not yet full (Octo's HistoryWrapper).
        """
        frame = fit_image(obs[IMAGE_KEY], self.image_size, what='the octo policy')
        if not self.history:
            self.history.extend([frame] * self.window)
        else:
            self.history.append(frame)
        self.steps += 1
        pad = np.arange(self.window) >= self.window - min(self.steps, self.window)
        return {IMAGE_KEY: np.stack(self.history)[None], 'timestep_pad_mask': pad[None]}

    def task(self, instruction: str) -> Any:
        """Octo's task for an instruction (created once per instruction)."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f'instruction must be a non-empty string, got {instruction!r}')
        if instruction not in self.tasks:
            self.tasks[instruction] = self.model.create_tasks(texts=[instruction])
        return self.tasks[instruction]

    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        """float32 (num_samples, H, 7) chunks in environment units; one step of history."""
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        task = self.task(instruction)
        actions = self.model.sample_actions(
            self.observe(obs), task, unnormalization_statistics=self.unnormalization,
            rng=self.keys(), sample_shape=(num_samples,))
        return self.to_chunks(actions, num_samples)

    def to_chunks(self, actions: Any, num_samples: int) -> np.ndarray:
        """Octo's (K, 1, H, A) un-normalised actions -> (K, H, 7), gripper clipped to [0, 1]."""
        actions = np.asarray(actions, np.float32)
        expected = (num_samples, 1, self.action_horizon)
        if actions.ndim != 4 or actions.shape[:3] != expected or actions.shape[3] < ACTION_DIM:
            raise ValueError(f'Octo returned actions of shape {actions.shape}, expected '
                             f'{expected} + (>= {ACTION_DIM},)')
        chunks = actions[:, 0, :, :ACTION_DIM].copy()
        chunks[..., GRIPPER] = np.clip(chunks[..., GRIPPER], 0.0, 1.0)
        return check_action_chunks(chunks, num_samples, self.action_horizon)
