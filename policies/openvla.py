"""'openvla': OpenVLA (Kim et al., 2024) through `transformers`, behind the Policy protocol.

OpenVLA is a Llama-2 vision-language model whose last 256 vocabulary entries are action bins.
Each of the 7 action dimensions is normalised to [-1, 1] with its training dataset's 1st and
99th percentiles (q01, q99; dimensions whose `mask` is False, the gripper, pass unnormalised),
then written as the token `vocab_size - digitize(x, linspace(-1, 1, 256))`; decoding takes the
bin centre. The prompt is 'In: What action should the robot take to {instruction}?\\nOut:'
followed by the empty token '▁' the model saw at training time. One action per step (H = 1).

What the adapter adds:
- `sample_actions(obs, instruction, K)`: ONE forward pass over image + prompt builds the
  prefix's key/value cache; the K samples are decoded in parallel from it, each token drawn from
  the 256 action tokens only;
- `supervised_loss(batch)`: cross-entropy of the 7 action tokens (OpenVLA's own fine-tuning
  loss), through LoRA adapters (`peft`) once `enable_lora` was called;
- `encode` / `head_sample` / `action_space` with ChunkPolicy's meanings, so PA-RL
  (robot_rl.rl.parl) samples, optimises and distils it unchanged.

Units. The policy's normalised units are its ActionSpace's: [q01, q99] for the normalised
dimensions (so they equal OpenVLA's own normalised values), [-1, 1] for other unnormalised ones,
and [0, 1] for the gripper. Open X-Embodiment data, and so OpenVLA, use gripper 1 = open,
0 = closed, as this project does; the unnormalised gripper output (a bin centre in [-1, 1]) is
clipped into [0, 1].

Instructions. PA-RL batches carry the critic's language embeddings, not text, while OpenVLA reads
text. The policy keeps a table of the instructions it has seen (`embed`, or
`remember_instructions` for embeddings computed elsewhere) and maps each embedding row back to
its text; an embedding it has never seen is an error, never a guess.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from policies.base import check_action_chunks, dataset_action_stats, register_policy
from policies.common import masked_mean, PolicyBatch
from robot_rl.models.language import shared_encoder
from robot_rl.types import ACTION_DIM, ActionSpace, IMAGE_KEY, Observation

logger = logging.getLogger(__name__)

PROMPT = 'In: What action should the robot take to {instruction}?\nOut:'
"""OpenVLA's prompt (the instruction lower-cased, as in its training data pipeline)."""
NUM_BINS = 256
"""Uniform bins over [-1, 1] per action dimension; the last NUM_BINS tokens of the vocabulary."""
SPACE_PIECE = '\u2581'
"""SentencePiece's word-boundary piece: OpenVLA's prompts end with it before the actions."""
GRIPPER = ACTION_DIM - 1
MIN_SPAN = 1e-6
"""A normalised dimension whose q01 equals its q99 (it never moved) gets this width."""
EMBEDDING_TOLERANCE = 1e-3
"""Largest distance between a language embedding and the remembered one it is taken for."""
AUTO_CLASSES = ('AutoModelForImageTextToText', 'AutoModelForVision2Seq')
"""transformers' auto class for image+text -> text models: the first is the 5.x name, the second
the 4.x one that OpenVLA's remote code registers itself under (config.auto_map)."""
INSTALL_HINT = 'pip install -c constraints.txt transformers peft'


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True, eq=False)
class ActionNormStats:
    """One dataset's action normalisation statistics, as OpenVLA stores them (float64 (7,))."""

    dataset_key: str
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray
    """bool (7,): True where the dimension is normalised with q01/q99 (all but the gripper)."""

    @property
    def span(self) -> np.ndarray:
        """q99 - q01, at least MIN_SPAN (a dimension that never moved decodes to its q01)."""
        return np.maximum(self.q99 - self.q01, MIN_SPAN)

    def action_space(self) -> ActionSpace:
        """The policy's normaliser: [q01, q99] where normalised, [-1, 1] else, gripper [0, 1]."""
        low = np.where(self.mask, self.q01, -1.0)
        high = np.where(self.mask, self.q01 + self.span, 1.0)
        low[GRIPPER], high[GRIPPER] = 0.0, 1.0
        return ActionSpace(low=low, high=high)

    def unnormalise(self, values: np.ndarray) -> np.ndarray:
        """OpenVLA's normalised actions (..., 7) -> environment units (project conventions)."""
        values = np.asarray(values, np.float64)
        env = np.where(self.mask, 0.5 * (values + 1.0) * self.span + self.q01, values)
        env[..., GRIPPER] = np.clip(env[..., GRIPPER], 0.0, 1.0)
        return env.astype(np.float32)


def read_norm_stats(source: Union[str, Path, Mapping[str, Any]]) -> Dict[str, Any]:
    """OpenVLA-style statistics {dataset_key: {'action': {'q01', 'q99', 'mask', ...}}}.

    `source` is such a mapping, the project's own statistics (a robot_rl.data.oxe.StatsTable,
    or its JSON form), or a JSON file holding either (OpenVLA's fine-tuning writes its
    dataset_statistics.json next to its checkpoints).
    """
    from robot_rl.data.oxe import StatsTable

    if not isinstance(source, Mapping):
        path = Path(source)
        try:
            source = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f'cannot read normalisation statistics from {path}: {err}') from None
        if not isinstance(source, dict):
            raise ValueError(f'{path}: normalisation statistics must be a JSON object keyed by '
                             f'dataset, got {type(source).__name__}')
    if not isinstance(source, StatsTable) and source and all(
            isinstance(v, Mapping) and 'stats' in v for v in source.values()):
        source = StatsTable.from_dict(source)
    if isinstance(source, StatsTable):
        return from_stats_table(source)
    return dict(source)


def from_stats_table(table: Mapping[str, Any]) -> Dict[str, Any]:
    """OpenVLA-style statistics from the project's StatsTable: q01/q99 are its p01/p99 (the
    same percentiles), and the gripper is not normalised (OpenVLA's mask for OXE data)."""
    mask = [True] * (ACTION_DIM - 1) + [False]
    return {key: {'action': {'q01': stats.action.p01.tolist(), 'q99': stats.action.p99.tolist(),
                             'mask': mask}} for key, stats in table.items()}


def action_norm_stats(norm_stats: Mapping[str, Any], dataset_key: Optional[str],
                      source: str = 'the model') -> ActionNormStats:
    """The action statistics of `dataset_key` in an OpenVLA-style statistics mapping.

    Checked by policies.base.dataset_action_stats, plus q01 <= q99. `dataset_key` None is
    allowed only when `source` holds exactly one dataset.
    """
    keys = sorted(norm_stats)
    if dataset_key is None:
        if len(keys) != 1:
            raise ValueError(f'{source} holds normalisation statistics for {len(keys)} datasets '
                             f'{keys}; choose one with unnorm_key')
        dataset_key = keys[0]
    stats = dataset_action_stats(norm_stats, dataset_key, ('q01', 'q99'), source)
    if np.any(stats['q99'] < stats['q01']):
        raise ValueError(f'action statistics of dataset key {dataset_key!r} need q01 <= q99, '
                         f'got {stats}')
    return ActionNormStats(dataset_key, stats['q01'], stats['q99'], stats['mask'])


# ----------------------------------------------------------------------------- action tokens


def bin_edges(device=None) -> torch.Tensor:
    """The NUM_BINS uniform bin edges over [-1, 1]: OpenVLA's `bins`, from numpy's linspace
    itself (torch's rounds some edges differently in the last bit, moving values on an edge)."""
    return torch.from_numpy(np.linspace(-1.0, 1.0, NUM_BINS)).to(device)


def bin_centres(device=None) -> torch.Tensor:
    """The NUM_BINS - 1 centres between consecutive edges (OpenVLA's `bin_centers`)."""
    edges = bin_edges(device)
    return (edges[:-1] + edges[1:]) / 2


def action_tokens(values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Normalised actions (..., 7) -> token ids: vocab_size - digitize(clip(x, -1, 1), edges).

    torch.bucketize(right=True) is numpy's digitize: edges[i - 1] <= x < edges[i] gives i.
    """
    edges = bin_edges(values.device)
    index = torch.bucketize(values.double().clamp(-1.0, 1.0), edges, right=True)
    return vocab_size - index


def token_values(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids -> bin centres (float32): index vocab_size - token - 1 clipped to the centres."""
    centres = bin_centres(tokens.device)
    index = (vocab_size - tokens - 1).clamp(0, centres.shape[0] - 1)
    return centres[index].float()


# ----------------------------------------------------------------------------- instructions


class InstructionTable:
    """Language embeddings -> the instruction texts they were made from (see module docstring)."""

    def __init__(self):
        self.texts: List[str] = []
        self.embeddings: Optional[torch.Tensor] = None  # (N, D) float32, CPU

    def remember(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Record that row i of `embeddings` (N, D) embeds texts[i]."""
        embeddings = torch.as_tensor(embeddings).detach().float().cpu()
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f'need one embedding row per instruction: {len(texts)} texts, '
                             f'embeddings of shape {tuple(embeddings.shape)}')
        if self.embeddings is not None and embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f'embeddings of {embeddings.shape[1]} dimensions; the table holds '
                             f'{self.embeddings.shape[1]}-d ones')
        for text, row in zip(texts, embeddings):
            if text in self.texts:
                continue
            self.texts.append(text)
            self.embeddings = (row[None] if self.embeddings is None
                               else torch.cat([self.embeddings, row[None]]))

    def lookup(self, lang_emb: torch.Tensor) -> List[str]:
        """(B, D) embeddings -> B instruction texts; ValueError for a row never remembered."""
        if self.embeddings is None:
            raise ValueError('no instruction has been embedded through this policy; call '
                             'policy.embed(texts) or policy.remember_instructions(texts, '
                             'embeddings) before passing language embeddings')
        rows = torch.as_tensor(lang_emb).detach().float().cpu()
        if rows.ndim != 2 or rows.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f'language embeddings of shape {tuple(rows.shape)}; remembered '
                             f'ones are {self.embeddings.shape[1]}-d')
        distance, index = torch.cdist(rows, self.embeddings).min(dim=1)
        unknown = torch.nonzero(distance > EMBEDDING_TOLERANCE).flatten()
        if unknown.numel():
            raise ValueError(f'language embedding row {int(unknown[0])} matches none of the '
                             f'{len(self.texts)} remembered instructions (nearest at distance '
                             f'{float(distance[unknown[0]]):.3g}); remember its text first')
        return [self.texts[i] for i in index.tolist()]


# ----------------------------------------------------------------------------- loading


def load_vla(path: str, trust_remote_code: bool = False, dtype: str = 'bfloat16'):
    """(model, processor) of a pretrained vision-language(-action) model directory or hub id.

    OpenVLA ships its own modelling code: it loads only with trust_remote_code=True (an explicit
    opt-in: the code runs on this machine). Its config registers the model under the 4.x name
    AutoModelForVision2Seq only, so on transformers 5.x the class comes from config.auto_map.
    """
    try:
        import transformers
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
    except ImportError as err:
        raise ImportError(f'the openvla policy needs transformers: {INSTALL_HINT}') from err
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f'dtype must name a torch dtype (bfloat16, float16, float32), got '
                         f'{dtype!r}')
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto_map = getattr(config, 'auto_map', None) or {}
    remote = [auto_map[name] for name in AUTO_CLASSES if name in auto_map]
    if remote and not trust_remote_code:
        raise ValueError(f'{path} runs its own modelling code ({remote[0]}); load it with '
                         'trust_remote_code=True if you trust that code')
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if remote:
        model_class = get_class_from_dynamic_module(remote[0], path)
    else:
        model_class = next((getattr(transformers, name) for name in AUTO_CLASSES
                            if hasattr(transformers, name)), None)
        if model_class is None:
            raise ImportError(f'transformers {transformers.__version__} has none of '
                              f'{AUTO_CLASSES}')
    model = model_class.from_pretrained(path, **kwargs)
    processor = transformers.AutoProcessor.from_pretrained(path,
                                                           trust_remote_code=trust_remote_code)
    return model, processor


# ----------------------------------------------------------------------------- the policy


class PrefixGroup(NamedTuple):
    """Rows whose prompts have the same token length, encoded together (no padding)."""
    rows: torch.Tensor     # int64 (b,) row indices into the batch
    cache: Any             # the prefix's key/value cache (transformers Cache or legacy tuples)
    logits: torch.Tensor   # float32 (b, V) next-token logits after the prefix
    length: int            # cached positions per row (image tokens included)


class Prefix(NamedTuple):
    """`encode`'s output: B observations' image + prompt, encoded once."""
    groups: List[PrefixGroup]
    batch_size: int


@register_policy('openvla')
class OpenVLAPolicy(nn.Module):
    """An OpenVLA-style model: sample K single-step actions, supervised loss, LoRA.

    Args:
        model_path: directory or hub id of the model (e.g. 'openvla/openvla-7b'); loaded with
            its processor unless `model` and `processor` are given.
        unnorm_key: the dataset whose statistics un-normalise actions (e.g. 'bridge_orig').
        trust_remote_code: allow the model's own code to run (OpenVLA needs it).
        dtype: parameter dtype when loading ('bfloat16' on a GPU).
        device: where the model runs.
        norm_stats: statistics mapping or JSON path; default: the model's (OpenVLA keeps them
            in its config as `norm_stats`).
        temperature: sampling temperature over the action tokens; 0 takes the most likely
            token (all K samples then agree).
        seed: seed of the sampling generator.
        language_model: sentence encoder directory for `embed` (default: MiniLM).
        max_decode_batch: most sequences decoded at once (B x K is split into pieces).
        lora: LoRA settings (`enable_lora` keyword arguments) to apply now, or None.
        model, processor: an already-built model and processor instead of `model_path`.
    """

    name = 'openvla'
    action_horizon = 1

    def __init__(self, model_path: str = '', unnorm_key: Optional[str] = None, *,
                 trust_remote_code: bool = False, dtype: str = 'bfloat16',
                 device: Union[str, torch.device] = 'cpu',
                 norm_stats: Optional[Union[str, Path, Mapping[str, Any]]] = None,
                 temperature: float = 1.0, seed: int = 0, language_model: Optional[str] = None,
                 max_decode_batch: int = 256, lora: Optional[Mapping[str, Any]] = None,
                 model: Optional[nn.Module] = None, processor: Any = None):
        super().__init__()
        if temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        if max_decode_batch < 1:
            raise ValueError(f'max_decode_batch must be >= 1, got {max_decode_batch}')
        if (model is None) != (processor is None):
            raise ValueError('give both model and processor, or neither (then model_path)')
        if model is None:
            if not model_path:
                raise ValueError('the openvla policy needs model_path (or model and processor)')
            model, processor = load_vla(model_path, trust_remote_code, dtype)
        if norm_stats is None:
            source = f'the config of {model_path or type(model).__name__}'
        else:
            source = 'the given norm_stats' if isinstance(norm_stats, Mapping) else str(norm_stats)
        stats = (read_norm_stats(norm_stats) if norm_stats is not None
                 else getattr(model, 'norm_stats', None) or getattr(model.config, 'norm_stats',
                                                                    None))
        if not stats:
            raise ValueError(f'{source} carries no normalisation statistics; pass norm_stats '
                             '(a mapping or the path of a dataset_statistics.json)')
        self.stats = action_norm_stats(stats, unnorm_key, source)
        self.action_space = self.stats.action_space()
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, 'tokenizer', processor)
        self.vocab_size = int(self.tokenizer.vocab_size)
        """End of the action tokens: the tokenizer's vocabulary without added tokens (OpenVLA:
        32000, while its embedding matrix is padded to 32064)."""
        outputs = self.model.get_output_embeddings().weight.shape[0]
        if not NUM_BINS < self.vocab_size <= outputs:
            raise ValueError(f'the tokenizer has {self.vocab_size} tokens and the model '
                             f'{outputs} outputs; {NUM_BINS} action tokens need '
                             f'{NUM_BINS} < tokens <= outputs')
        space = self.tokenizer.convert_tokens_to_ids(SPACE_PIECE)
        self.space_token = None if space in (None, self.tokenizer.unk_token_id) else int(space)
        self.image_token = getattr(processor, 'image_token', None) or ''
        """Llava-style processors expand this placeholder into the image's tokens; OpenVLA's
        processor has none (its model puts the image after the first token itself)."""
        self.temperature = float(temperature)
        self.max_decode_batch = int(max_decode_batch)
        self.language_model = language_model
        self.instructions = InstructionTable()
        self.model.to(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        if lora is not None:
            self.enable_lora(**dict(lora))

    # -- the Policy protocol ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, *args, **kwargs):  # keep the sampling generator on the model's device
        module = super().to(*args, **kwargs)
        if self.generator.device != self.device:
            self.generator = torch.Generator(device=self.device).manual_seed(
                int(self.generator.initial_seed()))
        return module

    def reset(self, seed: Optional[int] = None) -> None:
        """OpenVLA keeps no per-episode state; a seed restarts its sampling stream."""
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        """float32 (num_samples, 1, 7) actions in environment units, from one encoding."""
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        image = np.asarray(obs[IMAGE_KEY])
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                prefix = self.encode_instructions(image[None], [instruction])
                norm = self.head_sample(prefix, num_samples)[0]
        finally:
            self.train(was_training)
        actions = self.action_space.unnormalise(norm.cpu().numpy())
        return check_action_chunks(actions, num_samples, self.action_horizon)

    # -- prompts and encoding ----------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f'instruction must be a non-empty string, got {instruction!r}')
        return self.image_token + PROMPT.format(instruction=instruction.strip().lower())

    def prompt_inputs(self, images, instructions: Sequence[str]
                      ) -> List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """(rows, model inputs) per group of prompts of one token length, on the device.

        images: uint8 (B, h, w, 3) (numpy or torch); the processor resizes them. Grouping by
        length means no padding anywhere, so positions and caches need no masking.
        """
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f'the openvla policy expects uint8 images (B, H, W, 3), got '
                             f'{images.dtype} {images.shape}')
        if len(instructions) != images.shape[0]:
            raise ValueError(f'{images.shape[0]} images but {len(instructions)} instructions')
        texts = [self.prompt(text) for text in instructions]
        groups: Dict[int, List[int]] = {}
        for row, text in enumerate(texts):
            groups.setdefault(len(self.tokenizer(text).input_ids), []).append(row)
        out = []
        for rows in groups.values():
            inputs = self.processor(text=[texts[i] for i in rows],
                                    images=[images[i] for i in rows], return_tensors='pt')
            ids = inputs['input_ids']
            if self.space_token is not None and not bool((ids[:, -1] == self.space_token).all()):
                ids = torch.cat([ids, torch.full_like(ids[:, :1], self.space_token)], dim=1)
            pixels = inputs['pixel_values'].to(self.device, self.model.dtype)
            out.append((torch.tensor(rows, device=self.device),
                        {'input_ids': ids.to(self.device), 'pixel_values': pixels,
                         'attention_mask': torch.ones_like(ids, device=self.device)}))
        return out

    @torch.no_grad()
    def encode_instructions(self, images, instructions: Sequence[str]) -> Prefix:
        """Image + prompt of each row through the model once: caches and next-token logits
        (for sampling, so without gradients)."""
        groups = []
        for rows, inputs in self.prompt_inputs(images, instructions):
            out = self.model(**inputs, use_cache=True)
            cache = out.past_key_values
            length = (cache.get_seq_length() if hasattr(cache, 'get_seq_length')
                      else cache[0][0].shape[-2])
            groups.append(PrefixGroup(rows, cache, out.logits[:, -1].float(), int(length)))
        return Prefix(groups, len(instructions))

    def embed(self, instructions: Sequence[str]) -> torch.Tensor:
        """(B, D) sentence embeddings (the critic's language encoder), remembered by text."""
        embeddings = shared_encoder(self.language_model, self.device).embed(
            list(instructions))
        self.remember_instructions(instructions, embeddings)
        return embeddings

    def remember_instructions(self, instructions: Sequence[str],
                              embeddings: torch.Tensor) -> None:
        """Make `encode` / `supervised_loss` accept `embeddings` (N, D) as these N texts."""
        self.instructions.remember(list(instructions), embeddings)

    def encode(self, images: torch.Tensor, lang_emb: torch.Tensor) -> Prefix:
        """ChunkPolicy's encode: uint8 images (B, h, w, 3) and remembered embeddings (B, D)."""
        return self.encode_instructions(images, self.instructions.lookup(lang_emb))

    # -- sampling ------------------------------------------------------------------------------

    def _step_model(self) -> nn.Module:
        """What extends a cached sequence by text tokens.

        OpenVLA's remote code keeps a complete causal LM as `language_model` and its own forward
        refuses cached steps for more than one sequence, so steps go there; Llava-style models
        (transformers 5.x) take text-only cached steps through their own forward.
        """
        language_model = getattr(self.model, 'language_model', None)
        if isinstance(language_model, nn.Module) and callable(
                getattr(language_model, 'get_output_embeddings', None)) and (
                language_model.get_output_embeddings() is not None):
            return language_model
        return self.model

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N,) token ids among the NUM_BINS action tokens only."""
        first = self.vocab_size - NUM_BINS
        action_logits = logits[:, first:self.vocab_size]
        if self.temperature == 0:
            index = action_logits.argmax(dim=-1)
        else:
            probs = torch.softmax(action_logits / self.temperature, dim=-1)
            index = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        return first + index

    def _decode(self, logits: torch.Tensor, cache: Any, length: int) -> torch.Tensor:
        """ACTION_DIM tokens for each of N cached sequences -> (N, 7) token ids."""
        step_model, tokens = self._step_model(), []
        for step in range(ACTION_DIM):
            tokens.append(self._draw(logits))
            if step == ACTION_DIM - 1:
                break
            mask = torch.ones(logits.shape[0], length + step + 1, dtype=torch.long,
                              device=logits.device)
            out = step_model(input_ids=tokens[-1][:, None], past_key_values=cache,
                             attention_mask=mask, use_cache=True)
            logits, cache = out.logits[:, -1].float(), out.past_key_values
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def sample_tokens(self, prefix: Prefix, num_samples: int) -> torch.Tensor:
        """(B, num_samples, 7) action token ids, num_samples per encoded observation."""
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        out = torch.zeros(prefix.batch_size, num_samples, ACTION_DIM, dtype=torch.long,
                          device=self.device)
        rows_at_once = max(1, self.max_decode_batch // num_samples)
        for group in prefix.groups:
            for start in range(0, len(group.rows), rows_at_once):
                local = torch.arange(start, min(start + rows_at_once, len(group.rows)),
                                     device=group.logits.device)
                cache = _repeat_cache(group.cache, local, num_samples)
                logits = group.logits[local].repeat_interleave(num_samples, dim=0)
                tokens = self._decode(logits, cache, group.length)
                out[group.rows[local]] = tokens.view(len(local), num_samples, ACTION_DIM)
        return out

    def head_sample(self, prefix: Prefix, num_samples: int) -> torch.Tensor:
        """ChunkPolicy's head_sample: (B, num_samples, 1, 7) actions in the policy's units."""
        values = token_values(self.sample_tokens(prefix, num_samples), self.vocab_size)
        return self.to_policy_units(values)[:, :, None]

    # -- units ---------------------------------------------------------------------------------

    def _stat(self, name: str, device) -> torch.Tensor:
        value = {'q01': self.stats.q01, 'span': self.stats.span, 'mask': self.stats.mask,
                 'low': self.action_space.low, 'high': self.action_space.high}[name]
        return torch.as_tensor(value, device=device)

    def to_policy_units(self, values: torch.Tensor) -> torch.Tensor:
        """OpenVLA's normalised actions (..., 7) -> the policy's ActionSpace units."""
        d = values.device
        values = values.double()
        scaled = 0.5 * (values + 1) * self._stat('span', d) + self._stat('q01', d)
        env = torch.where(self._stat('mask', d), scaled, values)
        env[..., GRIPPER] = env[..., GRIPPER].clamp(0.0, 1.0)
        low, high = self._stat('low', d), self._stat('high', d)
        return (2 * (env - low) / (high - low) - 1).float()

    def to_model_units(self, actions: torch.Tensor) -> torch.Tensor:
        """The policy's units (..., 7) -> OpenVLA's normalised actions, clipped to [-1, 1]."""
        d = actions.device
        low, high = self._stat('low', d), self._stat('high', d)
        env = (actions.double().clamp(-1, 1) + 1) / 2 * (high - low) + low
        values = torch.where(self._stat('mask', d),
                             2 * (env - self._stat('q01', d)) / self._stat('span', d) - 1, env)
        return values.clamp(-1.0, 1.0).float()

    # -- training ------------------------------------------------------------------------------

    def supervised_loss(self, batch: PolicyBatch) -> torch.Tensor:
        """Mean cross-entropy of the 7 action tokens of each example's (single-step) chunk.

        batch.actions (B, 1, 7) in the policy's units; batch.lang_emb rows must be remembered
        instructions (see module docstring); batch.mask (B, 1) weights the examples.
        """
        if batch.actions.ndim != 3 or batch.actions.shape[1:] != (1, ACTION_DIM):
            raise ValueError(f'the openvla policy predicts one action: batch actions must be '
                             f'(B, 1, {ACTION_DIM}), got {tuple(batch.actions.shape)}')
        instructions = self.instructions.lookup(batch.lang_emb)
        targets = action_tokens(self.to_model_units(batch.actions[:, 0].to(self.device)),
                                self.vocab_size)
        losses = torch.zeros(len(instructions), ACTION_DIM, device=self.device)
        for rows, inputs in self.prompt_inputs(batch.images, instructions):
            ids = torch.cat([inputs['input_ids'], targets[rows]], dim=1)
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=inputs['pixel_values'], use_cache=False).logits
            predicted = logits[:, -ACTION_DIM - 1:-1].float()  # position t predicts token t + 1
            losses[rows] = F.cross_entropy(predicted.transpose(1, 2), targets[rows],
                                           reduction='none')
        return masked_mean(losses[:, None], batch.mask.to(self.device).float())

    def enable_lora(self, r: int = 32, alpha: Optional[int] = None, dropout: float = 0.0,
                    target_modules: Union[str, Sequence[str]] = 'all-linear') -> None:
        """Freeze the model and train low-rank adapters on its linear layers (OpenVLA's recipe:
        rank 32, alpha min(r, 16), every linear layer but the output head, Gaussian init)."""
        try:
            from peft import get_peft_model, LoraConfig
        except ImportError as err:
            raise ImportError(f'LoRA fine-tuning needs peft: {INSTALL_HINT}') from err
        config = LoraConfig(r=r, lora_alpha=min(r, 16) if alpha is None else alpha,
                            lora_dropout=dropout, target_modules=target_modules,
                            init_lora_weights='gaussian')
        self.model = get_peft_model(self.model, config)

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters an optimiser should hold (the adapters only, after enable_lora)."""
        return [p for p in self.parameters() if p.requires_grad]


def _repeat_cache(cache: Any, rows: torch.Tensor, repeats: int) -> Any:
    """A new cache holding `rows` of `cache`, each repeated `repeats` times (the original is kept
    for later calls). Legacy caches (tuples of per-layer key/value tensors) are handled too."""
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t[rows].repeat_interleave(repeats, dim=0) for t in layer)
                     for layer in cache)
    cache = copy.deepcopy(cache)
    cache.batch_select_indices(rows)
    cache.batch_repeat_interleave(repeats)
    return cache
