"""Learner building blocks: labelled data in replay, batches on the device, checkpoints, ranks.

Shared by the offline critic trainer (`robot_rl.rl.train_critic`) and its evaluation
(`robot_rl.rl.evaluate_critic`); the online learner is meant to reuse them.

    episodes = read_source(path, split, labelling='vgps')         # labelled Episodes
    space = fit_action_space(episodes)                             # the one normaliser
    buffer = make_replay([normalise_actions(e, space) for e in episodes], gamma)
    batch = to_calql_batch(sampler.sample(256, rng), embed, device, augment)

Sections: reward labelling, reading and checking episodes, the action normaliser, replay,
batches (language and image augmentation), checkpoints (deployable critic and training state),
and torchrun ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
import shutil
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional,
                    Sequence, Tuple)
import uuid

import numpy as np
from omegaconf import OmegaConf
import torch
from torch import distributed as dist
from torch.nn import functional as F

from robot_rl.data.replay import ReplayBuffer, TransitionBatch
from robot_rl.data.rlds import ActionStats
from robot_rl.data.transitions import LABELLINGS, VGPS_SUCCESS_STEPS, vgps_first_success
from robot_rl.models import checkpoint
from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import CHECKPOINT_FORMAT as CRITIC_FORMAT, save_critic
from robot_rl.models.language import shared_encoder
from robot_rl.rl.calql import CalQL, CalQLBatch
from robot_rl.types import ActionSpace, Episode, REWARD_STEP, REWARD_SUCCESS

# ----------------------------------------------------------------------------- labelling

SOURCE_KEY = 'source'
"""Episode.metadata key naming where an episode came from ('<dir> [<split>] episode <i>')."""


def label_vgps(episode: Episode, success_steps: int = VGPS_SUCCESS_STEPS) -> List[Episode]:
    """V-GPS rewards: the last `success_steps` transitions get reward 0 and are terminal.

    Every other transition gets -1. An Episode can be terminal only at its last step, so the
    labelled demo comes back as the episode up to its first success transition (terminal
    there), then one 2-step terminal episode per later success transition: the same
    transitions with the same rewards, done flags and Monte-Carlo returns as V-GPS's.
    """
    count = episode.num_transitions
    first = vgps_first_success(count, success_steps)
    parts = [_terminal_slice(episode, 0, first + 1)]
    parts += [_terminal_slice(episode, t, t + 1) for t in range(first + 1, count)]
    return parts


def _terminal_slice(episode: Episode, start: int, end: int) -> Episode:
    """Steps start..end as an episode whose transitions earn -1 except the last, terminal, 0."""
    n = end - start + 1
    rewards = np.full(n, REWARD_STEP, np.float32)
    rewards[-2:] = REWARD_SUCCESS  # the success transition, and the last step's padding
    last = np.arange(n) == n - 1
    return Episode(images=episode.images[start:end + 1], states=episode.states[start:end + 1],
                   actions=episode.actions[start:end + 1], rewards=rewards,
                   discounts=np.where(last, 0.0, 1.0).astype(np.float32),
                   is_first=np.arange(n) == 0, is_last=last, is_terminal=last.copy(),
                   language_instruction=episode.language_instruction,
                   metadata=dict(episode.metadata, vgps_first_step=start))


def label_episode(episode: Episode, labelling: str) -> List[Episode]:
    """Episodes to store for one dataset episode under `labelling` (see LABELLINGS)."""
    if labelling == 'vgps':
        return label_vgps(episode)
    if labelling == 'dataset':
        return [episode]
    raise ValueError(f'labelling must be one of {LABELLINGS}, got {labelling!r}')


# ----------------------------------------------------------------------------- reading


def check_finite(episode: Episode, label: str) -> None:
    """ValueError naming `label`, the field and the step of the first non-finite value."""
    fields = {'rewards': episode.rewards, 'discounts': episode.discounts,
              'actions': episode.actions, 'mc_returns': episode.mc_returns}
    for name, values in fields.items():
        if values is None:
            continue
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        if bad.size:
            raise ValueError(f'{label}: {name} is not finite at step {bad[0]} '
                             f'({values[bad[0]]}); fix or drop this episode')


def read_source(path: str, split: str, labelling: str, image_size: Optional[int] = None,
                max_episodes: Optional[int] = None, layout: str = 'bridge') -> List[Episode]:
    """Labelled episodes of one RLDS directory split, each tagged with its source; `layout`
    (robot_rl.data.layouts) standardises the dataset's steps to the Bridge step format.

    Raises ValueError naming '<path> [<split>] episode <i>' for non-finite rewards, discounts,
    actions or stored returns (checked before labelling, which would overwrite rewards).
    """
    from robot_rl.data.rlds import iter_episodes  # imports TensorFlow, lazily

    size = None if image_size is None else (image_size, image_size)
    out: List[Episode] = []
    for index, episode in enumerate(iter_episodes(path, split, image_size=size, layout=layout)):
        if max_episodes is not None and index >= max_episodes:
            break
        label = f'{path} [{split}] episode {index}'
        check_finite(episode, label)
        episode.metadata[SOURCE_KEY] = label
        out += label_episode(episode, labelling)
    if not out:
        raise ValueError(f'{path} [{split}] holds no episodes')
    return out


# ----------------------------------------------------------------------------- normaliser

ACTION_BOUNDS = ('data', 'bridge')


def fit_action_space(episodes: Sequence[Episode], bounds: str = 'data',
                     margin: float = 0.1) -> ActionSpace:
    """The one action normaliser of a run.

    'data': per dimension, the 1st..99th percentile of the transitions' actions, widened by
    `margin` of that range on each side (so a few outliers clip while the uniform CQL samples
    still cover the whole data range); a dimension that never varies takes the Bridge bounds.
    'bridge': the fixed WidowX limits (ActionSpace.bridge()).
    The last step of an episode starts no transition, so its (often padding) action is skipped.
    """
    if bounds == 'bridge':
        return ActionSpace.bridge()
    if bounds != 'data':
        raise ValueError(f'action bounds must be one of {ACTION_BOUNDS}, got {bounds!r}')
    actions = np.concatenate([e.actions[:-1] for e in episodes])
    p01, p99 = np.percentile(actions.astype(np.float64), [1.0, 99.0], axis=0)
    return _widened(p01, p99, margin)


def action_space_from_stats(stats: Sequence[ActionStats], bounds: str = 'data',
                            margin: float = 0.1) -> ActionSpace:
    """fit_action_space from datasets' cached action statistics (rlds.compute_dataset_stats),
    for data that is streamed rather than held: no pass over the episodes here.

    'data': per dimension, from the lowest 1st percentile to the highest 99th percentile of the
    datasets (each dataset's typical range inside the bounds), widened by `margin` as in
    fit_action_space. The statistics cover every step, the episodes' final (padding) actions
    included, so the bounds can differ slightly from fit_action_space's on the same episodes.
    """
    if bounds == 'bridge':
        return ActionSpace.bridge()
    if bounds != 'data':
        raise ValueError(f'action bounds must be one of {ACTION_BOUNDS}, got {bounds!r}')
    if not stats:
        raise ValueError('action_space_from_stats needs the statistics of at least one dataset')
    p01 = np.min([s.p01 for s in stats], axis=0)
    p99 = np.max([s.p99 for s in stats], axis=0)
    return _widened(p01, p99, margin)


def _widened(p01: np.ndarray, p99: np.ndarray, margin: float) -> ActionSpace:
    """[p01 - margin * width, p99 + margin * width]; a flat dimension takes Bridge's bounds."""
    width = p99 - p01
    bridge = ActionSpace.bridge()
    flat = width < 1e-6
    return ActionSpace(low=np.where(flat, bridge.low, p01 - margin * width),
                       high=np.where(flat, bridge.high, p99 + margin * width))


def normalise_actions(episode: Episode, space: ActionSpace) -> Episode:
    """A copy of `episode` with actions clipped into the space and mapped to [-1, 1]."""
    return dataclasses.replace(episode, actions=space.normalise(space.clip(episode.actions)))


# ----------------------------------------------------------------------------- replay


def make_replay(episodes: Iterable[Episode], gamma: float) -> ReplayBuffer:
    """An in-memory ReplayBuffer (frames stored once) holding `episodes`, MC returns computed.

    Errors name the episode's source; a Monte-Carlo return that overflows is caught here.
    """
    buffer = ReplayBuffer(gamma=gamma)
    for episode in episodes:
        label = episode.metadata.get(SOURCE_KEY, 'episode')
        try:
            stored = buffer.add_episode(episode)
        except ValueError as err:
            raise ValueError(f'{label}: {err}') from None
        check_finite(stored, label)
    return buffer


# ----------------------------------------------------------------------------- batches

Embed = Callable[[Sequence[str]], Optional[torch.Tensor]]
"""Instructions (B,) -> embeddings (B, D) on the device, or None for a language-free critic."""


@functools.lru_cache(maxsize=2)
def make_embed(lang_dim: int, path: Optional[str], device: torch.device) -> Embed:
    """Embedding function for a critic with `lang_dim` (0 = no language: always None)."""
    if lang_dim == 0:
        return lambda texts: None
    encoder = shared_encoder(path, device)
    if encoder.dim != lang_dim:
        raise ValueError(f'critic.lang_dim is {lang_dim} but the language model '
                         f'{encoder.path} gives {encoder.dim}-d embeddings')
    return encoder.embed


def batch_embeddings(embed: Embed, batch: TransitionBatch,
                     device: torch.device) -> Optional[torch.Tensor]:
    """(B, D) embeddings: the model runs on the batch's vocabulary (cached), rows index it."""
    table = embed(list(batch.instructions))
    if table is None:
        return None
    return table[torch.as_tensor(batch.instruction_ids, device=device)]


def to_calql_batch(batch: TransitionBatch, embed: Embed, device: torch.device,
                   augment: Optional[Callable] = None) -> CalQLBatch:
    """Replay batch -> CalQLBatch on `device`; `augment(images, next_images)` when given."""
    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(device, non_blocking=True)

    images, next_images = tensor(batch.images), tensor(batch.next_images)
    if augment is not None:
        images, next_images = augment(images, next_images)
    return CalQLBatch(images=images, lang_emb=batch_embeddings(embed, batch, device),
                      actions=tensor(batch.actions), rewards=tensor(batch.rewards),
                      next_images=next_images, dones=tensor(batch.dones),
                      mc_returns=tensor(batch.mc_returns), states=tensor(batch.states),
                      next_states=tensor(batch.next_states))


@dataclasses.dataclass
class AugmentConfig:
    """Training-image augmentation (V-GPS/Octo settings); evaluation never augments."""

    enabled: bool = True
    """Augment training batches."""
    crop_scale: Tuple[float, float] = (0.8, 1.0)
    """Area of the random crop as a fraction of the image; the crop is resized back."""
    crop_ratio: Tuple[float, float] = (0.9, 1.1)
    """Aspect ratio (width / height) range of the crop."""
    brightness: float = 0.2
    """Added to every pixel (image in [0, 1]): a shift drawn from [-b, b]."""
    contrast: float = 0.2
    """Contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Saturation factor drawn from [1 - s, 1 + s]."""
    hue: float = 0.1
    """Hue rotation drawn from [-h, h] turns."""

    def __post_init__(self):
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        (s0, s1), (r0, r1) = self.crop_scale, self.crop_ratio
        checks = [
            (0.0 < s0 <= s1 <= 1.0, 'crop_scale: 0 < low <= high <= 1'),
            (0.0 < r0 <= r1, 'crop_ratio: 0 < low <= high'),
            (min(self.brightness, self.contrast, self.saturation, self.hue) >= 0.0,
             'brightness, contrast, saturation, hue >= 0'),
            (max(self.contrast, self.saturation) <= 1.0, 'contrast, saturation <= 1'),
        ]
        failed = [rule for ok, rule in checks if not ok]
        if failed:
            raise ValueError(f'AugmentConfig: need {"; ".join(failed)}')


# Rows of the RGB -> YIQ transform (hue rotates the I/Q plane) and the BT.601 luma weights.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def augment_pair(images: torch.Tensor, next_images: torch.Tensor, cfg: AugmentConfig,
                 generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop then colour jitter, drawn per row and shared by o_t and o_{t+1}.

    images, next_images: uint8 (B, H, W, 3) -> float (B, H, W, 3) in [0, 1], same size.
    Sharing the draw keeps the pair consistent, as the V-GPS pipeline does.
    """
    first, second = augment_views([images, next_images], cfg, generator)
    return first, second


def augment_views(views: Sequence[torch.Tensor], cfg: AugmentConfig,
                  generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """augment_pair for any number of views (B, H, W, 3) of the same rows: one draw per row."""
    b, copies = views[0].shape[0], len(views)
    x = torch.cat(list(views)).permute(0, 3, 1, 2).float() / 255.0  # (copies * B, 3, H, W)

    def draw(low: float, high: float) -> torch.Tensor:
        u = torch.rand(b, device=x.device, generator=generator)
        return (low + (high - low) * u).repeat(copies)  # row i of every view shares it

    x = _random_resized_crop(x, draw, cfg)
    x = _colour_jitter(x, draw, cfg)
    x = x.clamp(0.0, 1.0).permute(0, 2, 3, 1)
    return list(x.split(b))


def _random_resized_crop(x: torch.Tensor, draw, cfg: AugmentConfig) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, H, W): each row a random crop, resized back bilinearly."""
    scale = draw(*cfg.crop_scale)
    ratio = torch.exp(draw(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
    w = torch.sqrt(scale * ratio).clamp(max=1.0)  # crop width and height as fractions
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2], theta[:, 1, 2] = (1.0 - w) * draw(-1.0, 1.0), (1.0 - h) * draw(-1.0, 1.0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def _colour_jitter(x: torch.Tensor, draw, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on (N, 3, H, W) in [0, 1] (not yet clamped)."""
    yiq = _YIQ.to(x.device)

    def luma(v: torch.Tensor) -> torch.Tensor:
        return torch.einsum('c,nchw->nhw', yiq[0], v)[:, None]

    def per_row(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None, None]

    x = (x + per_row(draw(-cfg.brightness, cfg.brightness))).clamp(0.0, 1.0)
    mean = luma(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * per_row(draw(1 - cfg.contrast, 1 + cfg.contrast)) + mean).clamp(0.0, 1.0)
    gray = luma(x)
    x = (gray + (x - gray) * per_row(draw(1 - cfg.saturation, 1 + cfg.saturation)))
    angle = 2.0 * math.pi * draw(-cfg.hue, cfg.hue)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(x.shape[0], 3, 3, device=x.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = torch.linalg.inv(yiq) @ rotation @ yiq  # (N, 3, 3) in RGB
    return torch.einsum('nij,njhw->nihw', transform, x.clamp(0.0, 1.0))


# ----------------------------------------------------------------------------- checkpoints

CRITIC_FILE, TARGET_FILE = 'critic.safetensors', 'target_critic.safetensors'
ACTOR_FILE, STATE_FILE = 'actor.safetensors', 'state.safetensors'
ACTOR_FORMAT = 'robot_rl.actor/1'
STATE_FORMAT = 'robot_rl.calql_state/1'
_OPTIMIZERS = ('critic_opt', 'actor_opt', 'entropy_opt', 'alpha_opt')
_TEMPERATURES = ('log_alpha', 'log_entropy_alpha')


def save_actor(path: Path, actor: TanhGaussianActor, layout: Mapping[str, Any],
               extra: Mapping[str, Any]) -> None:
    """The actor's tensors; `layout` (feature_dim, action_dim, hidden_dims) rebuilds it."""
    checkpoint.save_checkpoint(path, actor, {'format': ACTOR_FORMAT, **layout,
                                             'extra': dict(extra)})


def load_actor(path: Path, device: torch.device = torch.device('cpu')) -> TanhGaussianActor:
    """Rebuild a `save_actor` file; ValueError names a foreign file or a mismatched tensor."""
    tensors, meta = checkpoint.read_checkpoint(path)
    if meta.get('format') != ACTOR_FORMAT:
        raise ValueError(f'{path}: not an actor checkpoint (format {meta.get("format")!r})')
    actor = TanhGaussianActor(meta['feature_dim'], meta['action_dim'],
                              tuple(meta['hidden_dims']))
    checkpoint.load_tensors_into(actor, tensors, source=str(path))
    return actor.to(device)


def save_training_checkpoint(directory: Path, algo: CalQL, action_space: ActionSpace,
                             actor_layout: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Write a complete checkpoint into `directory` (which must not exist yet), atomically.

    Files (safetensors + JSON sidecar each): critic and target_critic (deployable critics with
    the action space), actor, and state (temperatures and every optimiser's state flattened to
    tensors; hyper-parameters and step in the sidecar). Everything is written into a hidden
    temporary directory that is renamed to `directory` last.
    """
    tmp = directory.with_name(f'.{directory.name}.tmp-{uuid.uuid4().hex}')
    try:
        save_critic(tmp / CRITIC_FILE, algo.critic, action_space, extra=dict(meta))
        save_critic(tmp / TARGET_FILE, algo.target_critic, action_space, extra=dict(meta))
        save_actor(tmp / ACTOR_FILE, algo.actor, actor_layout, meta)
        tensors, optimizers = _training_state(algo)
        checkpoint.save_tensors(tmp / STATE_FILE, tensors, {
            'format': STATE_FORMAT, 'optimizers': optimizers, 'extra': dict(meta)})
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _training_state(algo: CalQL) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Temperatures and optimiser states as named tensors, plus the optimisers' JSON parts."""
    tensors = {name: getattr(algo, name).detach().reshape(1) for name in _TEMPERATURES}
    groups = {}
    for name in _OPTIMIZERS:
        optimizer = getattr(algo, name)
        if optimizer is not None:
            groups[name] = flatten_optimizer(name, optimizer, tensors)
    return tensors, groups


def flatten_optimizer(name: str, optimizer: torch.optim.Optimizer,
                      tensors: Dict[str, torch.Tensor]) -> List[Dict]:
    """Add the optimiser's state to `tensors` as '<name>.<index>.<key>'; return its groups."""
    state = optimizer.state_dict()
    for index, values in state['state'].items():
        for key, value in values.items():
            tensors[f'{name}.{index}.{key}'] = torch.as_tensor(value).reshape(-1)
    return state['param_groups']


def load_training_checkpoint(directory: Path, algo: CalQL) -> Dict[str, Any]:
    """Copy a checkpoint's tensors into `algo` in place (optimisers keep their parameters).

    Returns the sidecar's extra (step, config, ...). ValueError names the file and the first
    tensor whose shape does not match the configured networks.
    """
    for name, module in ((CRITIC_FILE, algo.critic), (TARGET_FILE, algo.target_critic),
                         (ACTOR_FILE, algo.actor)):
        tensors, meta = checkpoint.read_checkpoint(directory / name)
        expected = ACTOR_FORMAT if name == ACTOR_FILE else CRITIC_FORMAT
        if meta.get('format') != expected:
            raise ValueError(f'{directory / name}: format {meta.get("format")!r}, expected '
                             f'{expected!r}')
        checkpoint.load_tensors_into(module, tensors, source=str(directory / name))
    tensors, meta = checkpoint.read_checkpoint(directory / STATE_FILE)
    if meta.get('format') != STATE_FORMAT:
        raise ValueError(f'{directory / STATE_FILE}: not a training state file')
    with torch.no_grad():
        for name in _TEMPERATURES:
            getattr(algo, name).copy_(tensors[name].reshape(()))
    for name, groups in meta['optimizers'].items():
        load_optimizer(getattr(algo, name), name, groups, tensors)
    return meta['extra']


def load_optimizer(optimizer: torch.optim.Optimizer, name: str, groups: List[Dict],
                   tensors: Mapping[str, torch.Tensor]) -> None:
    """Rebuild an optimiser state dict from `flatten_optimizer` tensors and load it."""
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups
                                               for p in g['params'])}
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    prefix = f'{name}.'
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix):].split('.', 1)
            index = int(index)
            # Adam keeps `step` as a 0-d tensor and its moments in the parameter's shape.
            shape = () if field == 'step' else shapes[index]
            state.setdefault(index, {})[field] = value.reshape(shape)
    optimizer.load_state_dict({'state': state, 'param_groups': groups})
    for group in optimizer.param_groups:  # JSON turned Adam's betas tuple into a list
        if 'betas' in group:
            group['betas'] = tuple(group['betas'])


def publish_alias(root: Path, target: Path, alias: str) -> None:
    """Point `root/alias` (a relative symlink) at `target` atomically (new link + rename)."""
    tmp = root / f'.{alias}.tmp-{uuid.uuid4().hex}'
    os.symlink(target.name, tmp)
    os.replace(tmp, root / alias)


def prune_checkpoints(root: Path, aliases: Sequence[str]) -> None:
    """Delete step directories no alias points at, and leftovers of interrupted writes."""
    keep = {(root / a).resolve() for a in aliases if (root / a).exists()}
    for path in root.iterdir():
        if path.is_symlink():
            if path.name.startswith('.'):  # an alias link that was never renamed into place
                path.unlink()
        elif path.name.startswith(('step_', '.step_')) and path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- run directories


class Run(NamedTuple):
    """Where a training run writes, and where it resumes from."""

    directory: Path
    checkpoints: Path
    start_step: int                       # updates already done (0 for a fresh run)
    action_space: Optional[ActionSpace]   # the resumed run's normaliser
    best: float                           # best_metric so far (-inf for a fresh run)


def make_run(output_dir: str, prefix: str, run_name: Optional[str], resume: bool,
             sidecar: str) -> Run:
    """A fresh run directory <output_dir>/<prefix><unix time> (or run_name), or the resumed
    run's (run_name, else the newest <prefix>* with a `last` checkpoint) with the step, the
    normaliser and the best metric read from `last/<sidecar>`'s JSON."""
    root = Path(output_dir)
    if not resume:
        directory = root / (run_name or f'{prefix}{int(time.time())}')
        if (directory / 'checkpoints').exists():
            raise ValueError(f'{directory} already holds checkpoints: pass resume=true to '
                             'continue it, or another run_name')
        return Run(directory, directory / 'checkpoints', 0, None, -math.inf)
    if run_name:
        directory = root / run_name
    else:
        runs = sorted(p for p in root.glob(f'{prefix}*')
                      if (p / 'checkpoints' / 'last').exists())
        directory = runs[-1] if runs else root / f'{prefix}<time>'
    last = directory / 'checkpoints' / 'last'
    if not last.exists():
        raise FileNotFoundError(f'resume=true but there is no checkpoint at {last}')
    meta = json.loads((last / sidecar).with_suffix('.json').read_text())
    extra = meta['extra']
    return Run(directory, directory / 'checkpoints', int(extra['step']),
               ActionSpace.from_dict(meta['action_space']), float(extra['best']))


# ----------------------------------------------------------------------------- logging


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic task runs after `done` updates (always after the last)."""
    return done % every == 0 or done == total


class Logger:
    """TensorBoard on rank 0 (no-op elsewhere): scalars, the config once, figures."""

    def __init__(self, directory: Path, world: World):
        self.writer = None
        if world.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(directory))

    def scalars(self, metrics: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                if math.isfinite(value):
                    self.writer.add_scalar(name, value, step)

    def config(self, cfg: Any, directory: Path, step: int) -> None:
        """Write the resolved config as config.yaml (fresh runs) and as TensorBoard text."""
        if self.writer is None:
            return
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if step == 0:
            (directory / 'config.yaml').write_text(text)
        self.writer.add_text('config', f'```yaml\n{text}```', step)

    def figure(self, name: str, figure, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(name, figure, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- ranks


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among torchrun ranks (rank 0 of 1 without torchrun)."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' means this rank's local GPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    return torch.device(name)


def init_world(device: str) -> World:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    resolved = resolve_device(device, int(os.environ.get('LOCAL_RANK', '0')))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if resolved.type == 'cuda' else 'gloo')
    return World(rank, size, resolved)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Copy rank 0's values into every rank's tensors (what DDP does at construction)."""
    if world.size > 1:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(optimizers: Iterable[Optional[torch.optim.Optimizer]],
                      world: World) -> None:
    """Make every optimiser step on the mean of the ranks' gradients (DDP's all-reduce).

    A DistributedDataParallel wrapper syncs gradients only for backward passes of its own
    forward, but Cal-QL calls the critic's encode, q and td_loss separately (and the actor
    loss backpropagates into the critic heads). A step pre-hook that all-reduces every
    gradient of the optimiser in one flat buffer gives the same mean-gradient update for
    any call pattern, including the temperatures.
    """
    if world.size == 1:
        return

    def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group['params']]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world.size
        for param, chunk in zip(params, flat.split([p.numel() for p in params])):
            param.grad = chunk.view_as(param)

    for optimizer in optimizers:
        if optimizer is not None:
            optimizer.register_step_pre_hook(hook)


def mean_across_ranks(values: Sequence[float], world: World) -> List[float]:
    """Element-wise mean of `values` over ranks (identical on every rank afterwards)."""
    if world.size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()
