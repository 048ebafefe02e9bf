"""'autoregressive': a causal transformer over discretised action tokens (OpenVLA-style).

Each normalised action entry is one token: `bins` uniform bins over [-1, 1], decoded to the
bin centre. A chunk is H * 7 tokens, predicted left to right after a prefix token that carries
the observation feature z. Training is token cross-entropy with teacher forcing (the loss PA-RL
distils with); sampling draws the tokens one at a time for all samples in parallel.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from policies.base import register_policy
from policies.common import ACTION_DIM, ChunkPolicy, masked_mean
from robot_rl.types import ActionSpace


def tokenize(actions: torch.Tensor, bins: int) -> torch.Tensor:
    """Normalised actions in [-1, 1] -> int64 bin indices in [0, bins) (same shape)."""
    index = torch.floor((actions.clamp(-1.0, 1.0) + 1.0) * 0.5 * bins).long()
    return index.clamp(0, bins - 1)


def detokenize(tokens: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin indices -> bin centres in (-1, 1): within half a bin (1 / bins) of any bin member."""
    return (tokens.float() + 0.5) * (2.0 / bins) - 1.0


@register_policy('autoregressive')
class AutoregressivePolicy(ChunkPolicy):
    """[z prefix, tokens] -> causal transformer -> next-token logits over `bins`.

    Args (besides ChunkPolicy's):
        bins: uniform bins per action dimension over [-1, 1].
        d_model, layers, heads: transformer size.
        dropout: transformer dropout (training only).
        temperature: sampling temperature; 0 takes the most likely token (deterministic).
    """

    name = 'autoregressive'

    def __init__(self, action_space: Optional[ActionSpace] = None, horizon: int = 4,
                 encoder: Optional[Mapping[str, Any]] = None, language_model: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu', seed: int = 0, bins: int = 256,
                 d_model: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.0,
                 temperature: float = 1.0):
        super().__init__(action_space, horizon, encoder, language_model, device, seed)
        if bins < 2:
            raise ValueError(f'bins must be >= 2, got {bins}')
        if temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        self.bins, self.d_model = int(bins), int(d_model)
        self.layers, self.heads = int(layers), int(heads)
        self.dropout, self.temperature = float(dropout), float(temperature)
        self.seq_len = self.action_horizon * ACTION_DIM
        self.prefix = nn.Linear(self.feature_dim, self.d_model)
        self.token_embedding = nn.Embedding(self.bins, self.d_model)
        # Position p holds the input that predicts token p: the prefix at 0, token p-1 after.
        self.positions = nn.Parameter(torch.zeros(self.seq_len, self.d_model))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(self.d_model, heads, 4 * self.d_model, self.dropout,
                                           activation='gelu', batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(self.d_model)
        self.logits = nn.Linear(self.d_model, self.bins)
        self.to(device)

    def head_config(self) -> Dict[str, Any]:
        return {'bins': self.bins, 'd_model': self.d_model, 'layers': self.layers,
                'heads': self.heads, 'dropout': self.dropout, 'temperature': self.temperature}

    def next_token_logits(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, k + 1, bins) for tokens 0..k, given z (B, F) and tokens 0..k-1 (B, k)."""
        x = torch.cat([self.prefix(z)[:, None], self.token_embedding(tokens)], dim=1)
        length = x.shape[1]
        x = x + self.positions[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=z.device,
                                                                dtype=x.dtype)
        return self.logits(self.norm(self.transformer(x, mask=causal, is_causal=True)))

    def head_loss(self, z: torch.Tensor, actions: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced token cross-entropy of actions (B, H, 7), averaged over real steps."""
        tokens = tokenize(actions, self.bins).flatten(1)
        logits = self.next_token_logits(z, tokens[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction='none')
        return masked_mean(ce.view(actions.shape), mask)

    def head_sample(self, z: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Token-by-token sampling: z (B, F) -> (B, num_samples, H, 7) bin centres.

        The whole prefix is recomputed at every step: the sequences are H * 7 tokens, short
        enough that a key/value cache would not pay for its complexity.
        """
        b = z.shape[0]
        z = z.repeat_interleave(num_samples, dim=0)
        tokens = torch.zeros((z.shape[0], 0), dtype=torch.long, device=z.device)
        for _ in range(self.seq_len):
            logits = self.next_token_logits(z, tokens)[:, -1]
            if self.temperature == 0:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits.float() / self.temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=self.generator)
            tokens = torch.cat([tokens, token], dim=1)
        actions = detokenize(tokens, self.bins)
        return actions.view(b, num_samples, self.action_horizon, ACTION_DIM)
