"""A learned success detector: camera frame + instruction -> P(the task has succeeded).

The critic's encoder family (ResNet with coordinate channels and FiLM language conditioning,
robot_rl.models.resnet) and a small MLP head on its pooled feature. Trained on labelled
episodes' frames: an episode's final frame is a positive when the episode succeeded, its early
frames are negatives (frames near a success are left out: whether the task is done there is
ambiguous). At run time `propose` gives success or failure with a confidence, or 'ask' when the
confidence is below the threshold, so a person labels the episodes the classifier is unsure of.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from robot_rl.models.checkpoint import load_tensors_into, read_checkpoint, save_checkpoint
from robot_rl.models.resnet import ResNetEncoder
from robot_rl.types import Episode, fit_image

FORMAT = 'robot_rl.success_classifier/1'
LABELLINGS = ('terminal', 'final_success')
"""terminal: the episode's own success flag labels its final frame (simulation ground truth,
human-labelled robot episodes); final_success: every final frame is a success (demonstrations,
e.g. Bridge)."""
ASK = 'ask'


@dataclasses.dataclass
class ClassifierConfig:
    encoder_depth: int = 18
    """ResNet depth: 10 (tiny), 18 or 34."""
    encoder_width: int = 32
    """Stem channels; the feature is 8 * width."""
    lang_dim: int = 384
    """Language embedding size for FiLM (384 = MiniLM); 0 = no language."""
    hidden: int = 256
    """Width of the head's hidden layer."""
    image_size: int = 128
    """Frames are resized to this (square) before the encoder."""

    def __post_init__(self):
        if self.encoder_depth not in (10, 18, 34):
            raise ValueError(f'encoder_depth must be 10, 18 or 34, got {self.encoder_depth}')
        if min(self.encoder_width, self.hidden, self.image_size) < 1 or self.lang_dim < 0:
            raise ValueError('encoder_width, hidden, image_size must be >= 1 and lang_dim >= 0')


class SuccessClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.encoder_depth, config.encoder_width, True,
                                     config.lang_dim)
        self.head = nn.Sequential(nn.Linear(self.encoder.feature_dim, config.hidden), nn.SiLU(),
                                  nn.Linear(config.hidden, 1))

    def forward(self, images: torch.Tensor, lang: Optional[torch.Tensor]) -> torch.Tensor:
        """images uint8 (B, H, W, 3), lang (B, lang_dim) or None -> success logits (B,)."""
        return self.head(self.encoder(images, lang)).squeeze(-1)


@dataclasses.dataclass
class Frames:
    """Labelled frames: images uint8 (M, H, W, 3), labels float32 (M,), one instruction and
    one episode index per frame."""

    images: np.ndarray
    labels: np.ndarray
    instructions: List[str]
    episodes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def frames_from_episodes(episodes: Sequence[Episode], labelling: str = 'terminal',
                         negatives_per_episode: int = 3, margin: float = 0.4) -> Frames:
    """The final frame of each episode (label per `labelling`) and up to
    `negatives_per_episode` evenly spaced negatives (label 0): from the first (1 - margin) share
    of an episode that succeeded at its end, from all of one that failed (it never succeeded,
    so its late frames, the ones most like a success, are negatives too)."""
    if labelling not in LABELLINGS:
        raise ValueError(f'labelling must be one of {LABELLINGS}, got {labelling!r}')
    images, labels, instructions, index = [], [], [], []
    for i, episode in enumerate(episodes):
        n = len(episode)
        positive = labelling == 'final_success' or bool(episode.is_terminal[-1])
        last = max(int(n * (1.0 - margin)), 1) if positive else n - 1
        picks = np.unique(np.linspace(0, last - 1, negatives_per_episode).astype(int))
        for t, label in [(int(t), 0.0) for t in picks] + [(n - 1, float(positive))]:
            images.append(episode.images[t])
            labels.append(label)
            instructions.append(episode.language_instruction)
            index.append(i)
    if not images:
        raise ValueError('no episodes to take frames from')
    return Frames(np.stack(images), np.array(labels, np.float32), instructions,
                  np.array(index))


def concat(parts: Sequence[Frames]) -> Frames:
    offset, episodes = 0, []
    for p in parts:
        episodes.append(p.episodes + offset)
        offset += int(p.episodes.max()) + 1
    return Frames(np.concatenate([p.images for p in parts]),
                  np.concatenate([p.labels for p in parts]),
                  [s for p in parts for s in p.instructions], np.concatenate(episodes))


Embed = Callable[[List[str]], Optional[torch.Tensor]]


def _inputs(model: SuccessClassifier, images: np.ndarray, instructions: List[str],
            embed: Embed, device: torch.device):
    size = model.config.image_size
    fitted = np.stack([fit_image(im, (size, size), 'the success classifier') for im in images])
    lang = embed(instructions) if model.config.lang_dim else None
    return torch.from_numpy(fitted).to(device), None if lang is None else lang.to(device)


def train(model: SuccessClassifier, frames: Frames, embed: Embed, steps: int,
          batch_size: int = 32, lr: float = 3e-4, seed: int = 0) -> List[float]:
    """`steps` Adam steps of class-balanced binary cross-entropy; returns the losses."""
    if frames.labels.min() == frames.labels.max():
        raise ValueError('training frames hold a single class: need successes and failures')
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    positives = float(frames.labels.sum())
    pos_weight = torch.tensor((len(frames) - positives) / positives, device=device)
    model.train()
    losses = []
    for _ in range(steps):
        rows = rng.integers(len(frames), size=batch_size)
        images, lang = _inputs(model, frames.images[rows],
                               [frames.instructions[r] for r in rows], embed, device)
        labels = torch.from_numpy(frames.labels[rows]).to(device)
        loss = F.binary_cross_entropy_with_logits(model(images, lang), labels,
                                                  pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def probabilities(model: SuccessClassifier, images: np.ndarray, instructions: List[str],
                  embed: Embed, batch_size: int = 64) -> np.ndarray:
    """P(success) (M,) of each frame."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        x, lang = _inputs(model, images[rows], instructions[rows], embed, device)
        out.append(torch.sigmoid(model(x, lang)).float().cpu().numpy())
    return np.concatenate(out)


def metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
            confidence: float = 0.0) -> Dict[str, float]:
    """Precision, recall, accuracy at `threshold`; `ask_rate` = share of frames whose
    confidence max(p, 1 - p) is below `confidence` (those a person would label)."""
    predicted = probs >= threshold
    positive = labels >= 0.5
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    return {'precision': tp / (tp + fp) if tp + fp else float('nan'),
            'recall': tp / (tp + fn) if tp + fn else float('nan'),
            'accuracy': float(np.mean(predicted == positive)),
            'ask_rate': float(np.mean(np.maximum(probs, 1 - probs) < confidence)),
            'positives': int(positive.sum()), 'negatives': int((~positive).sum())}


@dataclasses.dataclass(frozen=True)
class Proposal:
    decision: str
    """'success', 'failure', or ASK (below the confidence threshold: a person decides)."""
    probability: float
    confidence: float


def checked_probability(p: Any) -> float:
    """`p` as a float; ValueError when it is not a probability (a classifier gone wrong)."""
    if (isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p)
            or not 0.0 <= p <= 1.0):
        raise ValueError(f'the success classifier returned {p!r}, not a probability in [0, 1]')
    return float(p)


def propose(probability: float, confidence_threshold: float) -> Proposal:
    """A label proposal from P(success): confident -> success/failure, else ask."""
    if not 0.5 <= confidence_threshold <= 1.0:
        raise ValueError(f'confidence_threshold must be in [0.5, 1], got {confidence_threshold}')
    confidence = max(probability, 1.0 - probability)
    if confidence < confidence_threshold:
        return Proposal(ASK, probability, confidence)
    return Proposal('success' if probability >= 0.5 else 'failure', probability, confidence)


def save_classifier(path, model: SuccessClassifier, extra: Optional[Dict] = None) -> None:
    save_checkpoint(path, model, {'format': FORMAT, 'config': dataclasses.asdict(model.config),
                                  **(extra or {})})


def load_classifier(path, device: str = 'cpu') -> SuccessClassifier:
    tensors, meta = read_checkpoint(path)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path}: not a success classifier (format {meta.get("format")!r})')
    model = SuccessClassifier(ClassifierConfig(**meta['config']))
    load_tensors_into(model, tensors, str(path))
    return model.to(device).eval()
