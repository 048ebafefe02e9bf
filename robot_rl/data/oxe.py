"""Open X-Embodiment mixtures: per-dataset statistics, weighted interleaving, PyTorch batches.

    sources = [OxeSource('bridge', '<dir>/bridge_dataset/1.0.0', layout='bridge', weight=2.0),
               OxeSource('fractal', '<dir>/fractal20220817_data/0.1.0', layout='fractal')]
    stats = load_stats(sources)          # computed once per dataset, cached beside its data
    ds = mixture_dataset(sources, batch_size=256, image_size=(224, 224), stats=stats,
                         normalise='bounds')
    for batch in torch_batches(ds): ...  # dict of torch tensors (+ instructions as str)

Every source is read by the one RLDS reader (robot_rl.data.rlds.step_stream): its layout
(robot_rl.data.layouts) standardises the steps, frames are decoded in parallel after
shuffling (tf.data AUTOTUNE), sources are interleaved by weight (tf.data
sample_from_datasets), batched and prefetched, so decoding overlaps the consumer. Batches
carry `dataset_index`, the position of the step's source in `sources`.

Statistics are looked up by dataset key (StatsTable): a key with no statistics raises
MissingStatsError (a KeyError) naming it, never an identity normalisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from robot_rl.data import rlds
from robot_rl.data.bridge_spec import import_tf
from robot_rl.data.layouts import COLUMN_KEYS, get_layout
from robot_rl.data.rlds import DatasetStats, NORMALISATIONS
from robot_rl.types import IMAGE_KEY, STATE_KEY

DATASET_INDEX_KEY = 'dataset_index'
"""Batch key: int32 (B,) position of each step's source in the mixture's `sources`."""


@dataclasses.dataclass(frozen=True)
class OxeSource:
    """One dataset of a mixture."""

    key: str
    """Dataset key: names the dataset in statistics (StatsTable) and in errors."""
    path: str
    """TFDS version directory <data_dir>/<name>/<version> (holds dataset_info.json)."""
    split: str = 'train'
    layout: str = 'bridge'
    """How its steps are stored (robot_rl.data.layouts.LAYOUTS)."""
    weight: float = 1.0
    """Share of the interleaved steps (normalised over the sources)."""

    def __post_init__(self):
        if not self.key:
            raise ValueError(f'OxeSource at {self.path}: key must be a non-empty string')
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f'OxeSource {self.key!r}: weight must be positive, got '
                             f'{self.weight}')
        get_layout(self.layout)  # ValueError listing the registered layouts


# ------------------------------------------------------------------------------- statistics

class MissingStatsError(KeyError):
    """No normalisation statistics for a dataset key (a KeyError naming the key)."""

    def __init__(self, key: str, known: Sequence[str]):
        super().__init__(f'no normalisation statistics for dataset key {key!r}; the table has '
                         f'{sorted(known)}')
        self.key = key

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class StatsTable(Mapping[str, DatasetStats]):
    """Dataset key -> DatasetStats (action and state), what un-normalising a policy needs.

    Saved as JSON ({key: DatasetStats.to_dict()}) beside checkpoints or data.
    """

    def __init__(self, stats: Mapping[str, DatasetStats]):
        self._stats = dict(stats)

    def __getitem__(self, key: str) -> DatasetStats:
        try:
            return self._stats[key]
        except KeyError:
            raise MissingStatsError(key, list(self._stats)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def to_dict(self) -> Dict[str, Any]:
        return {key: stats.to_dict() for key, stats in self._stats.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'StatsTable':
        table = {}
        for key, value in d.items():
            try:
                table[key] = DatasetStats.from_dict(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f'statistics of dataset key {key!r}: {e}') from e
        return cls(table)

    def save(self, path: os.PathLike) -> None:
        """Write JSON atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f'.{path.name}.tmp')
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: os.PathLike) -> 'StatsTable':
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_stats(sources: Sequence[OxeSource], cache: bool = True) -> StatsTable:
    """Each source's DatasetStats (rlds.compute_dataset_stats: cached beside its data)."""
    check_keys(sources)
    return StatsTable({s.key: rlds.compute_dataset_stats(s.path, s.split, layout=s.layout,
                                                         cache=cache) for s in sources})


# -------------------------------------------------------------------------------- mixture

def mixture_dataset(sources: Sequence[OxeSource], *, batch_size: int = 256,
                    image_size: Optional[Tuple[int, int]] = None, shuffle_buffer: int = 10_000,
                    seed: Optional[int] = None, normalise: Optional[str] = None,
                    stats: Optional[Mapping[str, DatasetStats]] = None,
                    action_mask: Optional[np.ndarray] = None,
                    num_threads: Optional[int] = None, drop_remainder: bool = True):
    """Endless tf.data of batches interleaved from `sources` by weight.

    Each batch (B = batch_size): IMAGE_KEY uint8 (B, H, W, 3), 'state' and 'action' float32
    (B, 7), 'reward', 'discount' float32 (B,), 'is_first', 'is_last', 'is_terminal' bool (B,),
    'language_instruction' string (B,), DATASET_INDEX_KEY int32 (B,). Each source repeats
    forever and is shuffled over `shuffle_buffer` steps (0: file order).
    image_size: (H, W) every frame is resized to; needed when the sources' frames differ.
    normalise: None, or a mode of NORMALISATIONS applied per source to its actions and states
        with that source's statistics (`stats`, a StatsTable: MissingStatsError names a key
        without any); action_mask (7,) bool picks the action dimensions normalised.
    num_threads: size of a private tf.data thread pool (None: TensorFlow's default pool).
    Raises ValueError before reading anything for a bad directory, layout or image size.
    """
    tf, _ = import_tf()
    check_keys(sources)
    if normalise is not None and normalise not in NORMALISATIONS:
        raise ValueError(f'normalise must be None or one of {NORMALISATIONS}, got {normalise!r}')
    if normalise is not None and stats is None:
        raise ValueError('normalise needs stats (load_stats(sources))')
    size = None if image_size is None else tuple(int(s) for s in image_size)
    streams = []
    for index, source in enumerate(sources):
        ds = rlds.step_stream(source.path, source.split, image_size=size,
                              shuffle_buffer=shuffle_buffer,
                              seed=None if seed is None else seed + index, repeat=True,
                              layout=source.layout)
        affines = None if normalise is None else _affines(stats[source.key], normalise,
                                                          action_mask)
        transform = _step_transform(index, affines, clip=normalise == 'bounds')
        streams.append(ds.map(tf.autograph.experimental.do_not_convert(transform)))
    return interleave(sources, streams, batch_size=batch_size, seed=seed,
                      num_threads=num_threads, drop_remainder=drop_remainder)


def interleave(sources: Sequence[OxeSource], streams: Sequence[Any], *, batch_size: int,
               seed: Optional[int] = None, num_threads: Optional[int] = None,
               drop_remainder: bool = True):
    """Endless per-source element streams -> one tf.data of batches mixed by the sources'
    weights (sample_from_datasets, seeded), batched and prefetched; num_threads as
    mixture_dataset. ValueError when the streams' IMAGE_KEY frames differ in size."""
    tf, _ = import_tf()
    _check_image_shapes(sources, streams)
    weights = np.array([s.weight for s in sources], np.float64)
    ds = tf.data.Dataset.sample_from_datasets(list(streams),
                                              weights=list(weights / weights.sum()), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    if num_threads is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(num_threads)
        ds = ds.with_options(options)
    return ds


def _affines(stats: DatasetStats, mode: str, action_mask: Optional[np.ndarray]):
    return {'action': stats.action.affine(mode, action_mask),
            STATE_KEY: stats.state.affine(mode)}


def _step_transform(index: int, affines: Optional[Mapping[str, Tuple]], clip: bool):
    """The per-source step map: the common keys, the source index, normalisation (affines:
    key -> ActionStats.affine(); clip to [-1, 1] for 'bounds')."""
    tf, _ = import_tf()

    def transform(step):
        out = {key: step[key] for key in COLUMN_KEYS}
        out[DATASET_INDEX_KEY] = tf.constant(index, tf.int32)
        for key, (offset, scale, keep) in (affines or {}).items():
            value = (step[key] - tf.constant(offset, tf.float32)) / tf.constant(scale, tf.float32)
            if clip:
                value = tf.clip_by_value(value, -1.0, 1.0)
            out[key] = tf.where(tf.constant(keep), step[key], value)
        return out

    return transform


def check_keys(sources: Sequence[OxeSource]) -> None:
    """ValueError for an empty mixture or a dataset key used twice."""
    if not sources:
        raise ValueError('a mixture needs at least one source')
    keys = [s.key for s in sources]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f'dataset keys must be unique in a mixture; repeated: {duplicated}')


def _check_image_shapes(sources: Sequence[OxeSource], streams) -> None:
    shapes = {s.key: tuple(ds.element_spec[IMAGE_KEY].shape) for s, ds in zip(sources, streams)}
    if len(set(shapes.values())) > 1 or any(None in shape for shape in shapes.values()):
        raise ValueError(f"the sources' frames differ in size ({shapes}): pass image_size to "
                         'resize them to one size')


def torch_batches(ds, source: str = 'mixture') -> Iterator[Dict[str, Any]]:
    """A batched pipeline as dicts of torch tensors (zero-copy from writable numpy arrays);
    'language_instruction' is a list of str. Read errors raise ValueError naming `source`."""
    import torch

    for batch in rlds.numpy_batches(ds, source):
        out: Dict[str, Any] = {key: torch.from_numpy(value) for key, value in batch.items()
                               if key != 'language_instruction'}
        out['language_instruction'] = batch['language_instruction'].tolist()
        yield out
