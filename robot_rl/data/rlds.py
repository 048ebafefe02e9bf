"""Read and write RLDS episodes as TFDS dataset directories; we write the Bridge step layout.

A dataset directory is `<data_dir>/<name>/<version>/`: TFRecord shards named
`<name>-<split>.tfrecord-<i>-of-<n>` plus dataset_info.json and features.json, so
`tfds.builder_from_directory` reads it. bridge_spec lists the step features.

    write_dataset({'train': episodes, 'val': more}, data_dir) -> the version directory
    write_examples({'train': examples}, features, data_dir, name=...)  any FeaturesDict
    append_episodes(episodes, data_dir)    one more shard, nothing rewritten (recording)
    iter_episodes(directory, split)        one Episode per record, in file order
    iter_steps(directory, split, ...)      batches of decoded steps for training (parallel tf.data)
    episode_stream(directory, split, ...)  episodes as tf.data (images encoded), sharded by reader
    compute_dataset_stats(directory, split) action and state statistics, cached as JSON

Every reader takes `layout` (robot_rl.data.layouts: 'bridge', the default, or 'fractal', ...):
the dataset's step features are standardised to the common step format as they are read.
Every reader checks the directory first (check_dataset): the layout's step features with their
shapes and dtypes, then every shard file dataset_info.json lists, counting its records against
shardLengths. A bad directory raises ValueError naming the feature or the file before any data
is returned. Directories are local paths. TensorFlow is imported lazily (bridge_spec.import_tf).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
import re
import shutil
import struct
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union
import uuid

import cv2
import numpy as np

from robot_rl.data import bridge_spec as spec
from robot_rl.data.bridge_spec import import_tf
from robot_rl.data.layouts import get_layout, Layout, lookup
from robot_rl.types import ACTION_DIM, Episode, IMAGE_KEY, STATE_KEY

PathLike = Union[str, os.PathLike]
LayoutLike = Union[str, Layout]

DEFAULT_NAME = 'robot_rl_episodes'
DEFAULT_VERSION = '1.0.0'
DEFAULT_SHARD_BYTES = 128 * 2 ** 20
STATS_FILE = 'action_stats.json'
"""Statistics cache beside the data: {split: {size key, layout, 'stats', 'state_stats'}}."""

MC_RETURN_KEY = 'mc_return'
IS_LAST_ADDED = 'is_last_added'
"""Episode.metadata key set (True) where the reader marked a clipped record's final step."""
# Step keys -> Episode fields (the language instruction is handled apart: one per episode).
_EPISODE_FIELDS = {
    IMAGE_KEY: 'images', STATE_KEY: 'states', 'action': 'actions', 'reward': 'rewards',
    'discount': 'discounts', 'is_first': 'is_first', 'is_last': 'is_last',
    'is_terminal': 'is_terminal', MC_RETURN_KEY: 'mc_returns',
}

_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')
_VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')
_RECORD_HEADER = 12  # TFRecord framing: uint64 data length + uint32 CRC of the length
_RECORD_FOOTER = 4  # uint32 CRC of the data


# ----------------------------------------------------------------------------------- writing

def write_dataset(splits: Mapping[str, Iterable[Episode]], data_dir: PathLike, *,
                  name: str = DEFAULT_NAME, version: str = DEFAULT_VERSION,
                  image_format: str = 'jpeg', jpeg_quality: int = 95,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                  description: str = '') -> Path:
    """Write episodes as the TFDS dataset directory `<data_dir>/<name>/<version>`; return it.

    splits: split name ('train', 'val', ...) -> episodes, any iterable (a generator of unknown
        length is streamed); each split needs at least one episode. Every episode must pass
        Episode.validate() and match the first one's image shape and whether mc_returns is set.
    image_format: 'jpeg' (lossy, `jpeg_quality` 0-100) or 'png' (lossless).
    max_shard_bytes: a shard file is closed when the next record would take it past this.
    The directory is assembled under a hidden temporary name beside the target and renamed
    into place last, so a failed write leaves nothing that looks like a dataset.
    Raises FileExistsError when the target exists and overwrite is False.
    """
    _check_write_args(splits, name, version, image_format, jpeg_quality)
    return _write(splits, _EpisodeEncoder(image_format, jpeg_quality), data_dir, name,
                  version, max_shard_bytes, overwrite, description)


def write_examples(splits: Mapping[str, Iterable[Mapping[str, Any]]], features,
                   data_dir: PathLike, *, name: str, version: str = DEFAULT_VERSION,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                   description: str = '') -> Path:
    """write_dataset for records of any layout: each example is a nested dict of numpy values
    that `features` (a tfds FeaturesDict, e.g. layouts.fractal_features()) serialises.

    TFDS's own encoders check every value against the features; a mismatch raises ValueError
    naming the split and the example.
    """
    _check_write_args(splits, name, version, 'png', 0)
    return _write(splits, _ExampleEncoder(features), data_dir, name, version, max_shard_bytes,
                  overwrite, description)


def _write(splits, encoder, data_dir: PathLike, name: str, version: str, max_shard_bytes: int,
           overwrite: bool, description: str) -> Path:
    """Shards and metadata into a hidden directory, renamed to <data_dir>/<name>/<version>."""
    target = Path(data_dir) / name / version
    if target.exists() and not overwrite:
        raise FileExistsError(f'{target} exists; pass overwrite=True to replace it')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f'.{version}.tmp-{uuid.uuid4().hex}'
    tmp.mkdir()
    try:
        infos = [_write_split(tmp, name, split, episodes, encoder, max_shard_bytes)
                 for split, episodes in splits.items()]
        _, tfds = import_tf()
        tfds.folder_dataset.write_metadata(
            data_dir=os.fspath(tmp), features=encoder.features, split_infos=infos,
            version=version, check_data=False, description=description or None)
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


APPEND_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}'
"""Shard names of appendable datasets: `<name>-<split>.tfrecord-<i>`, no shard count in the
name, so adding a shard renames nothing (TFDS reads the template from dataset_info.json)."""


def append_episodes(episodes: Iterable[Episode], data_dir: PathLike, *,
                    name: str = DEFAULT_NAME, version: str = DEFAULT_VERSION,
                    split: str = 'train', image_format: str = 'jpeg',
                    jpeg_quality: int = 95) -> Path:
    """Add episodes to `<data_dir>/<name>/<version>` as one new shard; create it when absent.

    For recording over hours: a call costs only the new episodes, and a restarted recorder
    continues its dataset instead of replacing it. Nothing written before is rewritten: the
    shard is written under a temporary name and renamed, then dataset_info.json is replaced
    (atomically); a crash in between leaves the dataset as it was (the next call reuses the
    orphan shard's name). Episodes must match the dataset's features (image shape and format,
    mc_returns or not): ValueError naming the difference. A dataset written by write_dataset
    (`-of-<n>` shard names) is refused rather than renamed. Concurrent appends to one dataset
    (threads or processes on one machine) take turns on a lock file, `.append.lock`.
    """
    _check_write_args({split: ()}, name, version, image_format, jpeg_quality)
    target = Path(data_dir) / name / version
    target.mkdir(parents=True, exist_ok=True)
    # Appends are read-modify-write of dataset_info.json and the next shard's name: two
    # writers at once (a flush timer and a shutdown flush, or two processes) would share a
    # shard file and lose one's shard length. An exclusive lock file serialises them.
    with open(target / '.append.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _append_locked(episodes, target, name, version, split, image_format,
                              jpeg_quality)


def _append_locked(episodes, target: Path, name: str, version: str, split: str,
                   image_format: str, jpeg_quality: int) -> Path:
    _, tfds = import_tf()
    infos, num_shards = [], 0
    if (target / 'dataset_info.json').is_file():
        infos = _split_infos(target, name)
        if any(info.filename_template.template != APPEND_TEMPLATE for info in infos):
            raise ValueError(f'{target} was not written by append_episodes (its shards are '
                             'named with a shard count); append to a new dataset')
        mine = [info for info in infos if info.name == split]
        num_shards = mine[0].num_shards if mine else 0
    encoder = _EpisodeEncoder(image_format, jpeg_quality)
    part = target / f'.{name}-{split}.tfrecord-{num_shards:05d}.part'
    try:
        new = _write_split(target, name, split, episodes, encoder, max_shard_bytes=2 ** 62,
                           part=part)
        existing = tfds.features.FeatureConnector.from_config(os.fspath(target)) \
            if infos else None
        if existing is not None and existing.to_json() != encoder.features.to_json():
            raise ValueError(f'episodes (image shape, has mc_returns) = {encoder._layout}, '
                             f'image format {image_format!r} do not match the features of '
                             f'{target}')
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    template = tfds.core.ShardedFileTemplate(
        data_dir=target, template=APPEND_TEMPLATE, dataset_name=name, split=split,
        filetype_suffix='tfrecord')
    os.rename(part, template.sharded_filepath(shard_index=num_shards, num_shards=None))
    merged = {info.name: info for info in infos}
    old = merged.get(split)
    merged[split] = tfds.core.SplitInfo(
        name=split, filename_template=template,
        shard_lengths=(list(old.shard_lengths) if old else []) + list(new.shard_lengths),
        num_bytes=(old.num_bytes if old else 0) + new.num_bytes)
    info = tfds.core.DatasetInfo(
        builder=tfds.core.dataset_info.DatasetIdentity(
            name=name, version=tfds.core.Version(version), data_dir=os.fspath(target),
            module_name=''),
        features=encoder.features)
    info.set_file_format(tfds.core.file_adapters.FileFormat.TFRECORD)
    info.set_splits(tfds.core.SplitDict(list(merged.values())))
    tmp = target / f'.metadata.tmp-{uuid.uuid4().hex}'
    tmp.mkdir()
    try:
        info.write_to_directory(tmp)
        for file in ('features.json', 'dataset_info.json'):  # the info last: it commits
            os.replace(tmp / file, target / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _split_infos(directory: Path, name: str) -> list:
    """The SplitInfos recorded in a dataset directory's dataset_info.json."""
    _, tfds = import_tf()
    info = json.loads((directory / 'dataset_info.json').read_text())
    infos = []
    for split in info.get('splits', []):
        template = tfds.core.ShardedFileTemplate(
            data_dir=directory, dataset_name=name, split=split['name'],
            filetype_suffix='tfrecord',
            template=split.get('filepathTemplate') or tfds.core.naming.DEFAULT_FILENAME_TEMPLATE)
        infos.append(tfds.core.SplitInfo(
            name=split['name'], shard_lengths=[int(n) for n in split['shardLengths']],
            num_bytes=int(split.get('numBytes', 0)), filename_template=template))
    return infos


def _check_write_args(splits, name: str, version: str, image_format: str,
                      jpeg_quality: int) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f'dataset name must match {_NAME_RE.pattern}, got {name!r}')
    if not _VERSION_RE.match(version):
        raise ValueError(f'version must look like 1.0.0, got {version!r}')
    if not splits:
        raise ValueError('no splits to write')
    bad = [split for split in splits if not _NAME_RE.match(split)]
    if bad:
        raise ValueError(f'split names must match {_NAME_RE.pattern}, got {bad}')
    if image_format not in spec.IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {spec.IMAGE_FORMATS}, got '
                         f'{image_format!r}')
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f'jpeg_quality must be in [0, 100], got {jpeg_quality}')


class _EpisodeEncoder:
    """Episode -> serialised tf.train.Example; the first episode fixes the features."""

    def __init__(self, image_format: str, jpeg_quality: int):
        self.image_format = image_format
        self.features = None
        self._layout = None  # (image shape, has mc_returns) of the first episode
        self._cv2_args = ('.png', []) if image_format == 'png' else (
            '.jpg', [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])

    def encode(self, episode: Episode) -> bytes:
        episode.validate()
        layout = (tuple(episode.images.shape[1:]), episode.mc_returns is not None)
        if self.features is None:
            self.features = spec.make_features(layout[0], self.image_format, layout[1])
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f'(image shape, has mc_returns) is {layout}, but the first episode '
                             f'written had {self._layout}')
        return self.features.serialize_example(self._example(episode))

    def _example(self, episode: Episode) -> Dict[str, Any]:
        steps = {
            spec.IMAGE: [self._encode_image(image) for image in episode.images],
            spec.STATE: episode.states,
            spec.ACTION: episode.actions,
            spec.REWARD: episode.rewards,
            spec.DISCOUNT: episode.discounts,
            spec.IS_FIRST: episode.is_first,
            spec.IS_LAST: episode.is_last,
            spec.IS_TERMINAL: episode.is_terminal,
            spec.LANGUAGE: [episode.language_instruction] * len(episode),
        }
        if episode.mc_returns is not None:
            steps[spec.MC_RETURN] = episode.mc_returns
        try:
            metadata = json.dumps(episode.metadata, sort_keys=True)
        except TypeError as e:
            raise ValueError(f'episode.metadata is not JSON-serialisable: {e}') from e
        return {spec.STEPS: _nest(steps),
                spec.EPISODE_METADATA: {spec.METADATA_JSON: metadata}}

    def _encode_image(self, image: np.ndarray) -> bytes:
        ext, params = self._cv2_args
        ok, buffer = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise ValueError(f'OpenCV could not encode a {image.shape} image as {ext}')
        return buffer.tobytes()


class _ExampleEncoder:
    """Nested dict of values -> serialised tf.train.Example with fixed features."""

    def __init__(self, features):
        self.features = features

    def encode(self, example: Mapping[str, Any]) -> bytes:
        try:
            return self.features.serialize_example(example)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f'example does not match the features: {e}') from e


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{'observation/state': x} -> {'observation': {'state': x}}."""
    nested: Dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def _write_split(directory: Path, name: str, split: str, episodes: Iterable[Any],
                 encoder, max_shard_bytes: int, part: Optional[Path] = None):
    """Stream one split's episodes into shard files; return its tfds SplitInfo.

    `part`: write one shard to this path and leave naming it to the caller (append)."""
    tf, tfds = import_tf()
    lengths: List[int] = []
    num_bytes = shard_bytes = 0
    writer = None
    try:
        for index, episode in enumerate(episodes):
            try:
                record = encoder.encode(episode)
            except ValueError as e:
                raise ValueError(f'split {split!r} episode {index}: {e}') from e
            # The shard count is unknown until the end: write numbered parts, name them after.
            if writer is None or shard_bytes + len(record) > max_shard_bytes:
                if writer is not None:
                    writer.close()
                writer = tf.io.TFRecordWriter(os.fspath(part or directory / _part_name(
                    name, split, len(lengths))))
                lengths.append(0)
                shard_bytes = 0
            writer.write(record)
            lengths[-1] += 1
            shard_bytes += _RECORD_HEADER + len(record) + _RECORD_FOOTER
            num_bytes += len(record)
    finally:
        if writer is not None:
            writer.close()
    if not lengths:
        raise ValueError(f'split {split!r} has no episodes')
    for i in range(0 if part else len(lengths)):
        os.rename(directory / _part_name(name, split, i),
                  directory / f'{name}-{split}.tfrecord-{i:05d}-of-{len(lengths):05d}')
    # num_bytes counts serialised examples without framing, as TFDS's own writer does.
    return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes)


def _part_name(name: str, split: str, index: int) -> str:
    return f'{name}-{split}.tfrecord-{index:05d}.part'


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename tmp to target; an existing target (overwrite) is moved aside, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f'{target} appeared while writing; pass overwrite=True')
    old = target.parent / f'.{target.name}.old-{uuid.uuid4().hex}'
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


# ------------------------------------------------------------------------------------ checks

def check_dataset(directory: PathLike, split: str = 'train', layout: LayoutLike = 'bridge'):
    """Open a dataset directory for reading `split`, or raise ValueError saying what is wrong.

    Checked before any record is decoded: dataset_info.json and features.json exist; the
    layout's step features (robot_rl.data.layouts; the message names the dataset directory,
    the layout and each bad feature) have the right kind, shape and dtype; `split` exists;
    every shard file of the split exists and holds exactly its shardLengths records (a cut or
    truncated file fails here, by name). Returns the tfds builder (builder_from_directory).
    """
    _, tfds = import_tf()
    directory = Path(directory)
    for required in ('dataset_info.json', 'features.json'):
        if not (directory / required).is_file():
            raise ValueError(f'{directory} is not a TFDS dataset directory: {required} is '
                             'missing')
    builder = tfds.builder_from_directory(os.fspath(directory))
    get_layout(layout).check(builder.info.features, os.fspath(directory))
    if split not in builder.info.splits:
        raise ValueError(f'{directory} has no split {split!r}; it has '
                         f'{sorted(builder.info.splits)}')
    info = builder.info.splits[split]
    for path, expected in zip(info.filepaths, info.shard_lengths):
        count = _count_records(os.fspath(path))
        if count != expected:
            raise ValueError(f'shard file {path} holds {count} records; dataset_info.json '
                             f'lists {expected}')
    return builder


def _count_records(path: str) -> int:
    """Records in one TFRecord file, walking the length headers without reading the data."""
    if not os.path.isfile(path):
        raise ValueError(f'shard file {path} listed in dataset_info.json is missing')
    size = os.path.getsize(path)
    count = position = 0
    with open(path, 'rb') as f:
        while position < size:
            header = f.read(_RECORD_HEADER)
            end = size + 1  # a header cut short
            if len(header) == _RECORD_HEADER:
                length = struct.unpack('<Q', header[:8])[0]
                end = position + _RECORD_HEADER + length + _RECORD_FOOTER
            if end > size:
                raise ValueError(f'shard file {path} is truncated or corrupt: record {count} at '
                                 f'byte {position} runs past the end of the file ({size} bytes)')
            f.seek(end)
            position = end
            count += 1
    return count


# ----------------------------------------------------------------------------------- reading

def iter_episodes(directory: PathLike, split: str = 'train', *,
                  image_size: Optional[Tuple[int, int]] = None,
                  layout: LayoutLike = 'bridge') -> Iterator[Episode]:
    """Episodes of one split in file order; the directory is checked before this returns.

    image_size: (H, W) to resize the primary image to (bilinear, antialiased); None keeps it.
    layout: how the dataset stores its steps (robot_rl.data.layouts), standardised as read.
    Each Episode (N steps): images uint8 (N, H, W, 3), states and actions float32 (N, 7),
    rewards and discounts float32 (N,), is_first/is_last/is_terminal bool (N,), the
    instruction of step 0, mc_returns float32 (N,) where steps/mc_return is stored (else None),
    metadata: episode_metadata as Python values, with our metadata_json parsed into it.
    A record with no is_last step (a clipped episode) gets is_last on its final step and
    metadata['is_last_added'] = True.
    Raises ValueError from check_dataset before returning, and naming the episode for a record
    that fails to read or to pass Episode.validate().
    """
    tf, _ = import_tf()
    layout = get_layout(layout)
    builder = check_dataset(directory, split, layout)
    decode = _image_decoder(builder, layout, image_size)
    has_mc_return = spec.step_feature(builder.info.features, spec.MC_RETURN) is not None

    def to_columns(raw):
        columns, is_last_added = _columns(raw[spec.STEPS], layout, has_mc_return)
        columns[IMAGE_KEY] = tf.map_fn(decode, columns[IMAGE_KEY], fn_output_signature=tf.uint8)
        columns['metadata'] = raw.get(spec.EPISODE_METADATA, {})
        columns[IS_LAST_ADDED] = is_last_added
        return columns

    ds = _map(_read_episodes(builder, split, shuffle=False, seed=None), to_columns,
              num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return _yield_episodes(ds, f'{directory} [{split}]')


def step_dataset(directory: PathLike, split: str = 'train', *, batch_size: int = 256,
                 image_size: Optional[Tuple[int, int]] = None, shuffle_buffer: int = 0,
                 seed: Optional[int] = None, repeat: bool = False,
                 drop_remainder: bool = False, layout: LayoutLike = 'bridge'):
    """The tf.data pipeline behind iter_steps (same options; yields tensors, not numpy).

    step_stream's decoded steps, batched and prefetched (AUTOTUNE). Images of a dataset with
    no fixed image shape need image_size to batch.
    """
    tf, _ = import_tf()
    ds = step_stream(directory, split, image_size=image_size, shuffle_buffer=shuffle_buffer,
                     seed=seed, repeat=repeat, layout=layout)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def step_stream(directory: PathLike, split: str = 'train', *,
                image_size: Optional[Tuple[int, int]] = None, shuffle_buffer: int = 0,
                seed: Optional[int] = None, repeat: bool = False,
                layout: LayoutLike = 'bridge'):
    """Unbatched tf.data of standardised, decoded steps (keys as iter_steps' batches).

    Records are read, standardised to the common step format (layout), flattened to steps with
    images still encoded, shuffled (shuffle_buffer steps; shard order too) and only then
    decoded, in parallel (AUTOTUNE). Without shuffling, steps come in file order.
    """
    tf, _ = import_tf()
    shuffle = shuffle_buffer > 0
    ds, decode = episode_stream(directory, split, image_size=image_size, shuffle=shuffle,
                                seed=seed, layout=layout)
    ds = ds.unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    return _map(ds, lambda step: {**step, IMAGE_KEY: decode(step[IMAGE_KEY])},
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=seed is not None or not shuffle)


def episode_stream(directory: PathLike, split: str = 'train', *,
                   image_size: Optional[Tuple[int, int]] = None, shuffle: bool = False,
                   seed: Optional[int] = None, layout: LayoutLike = 'bridge',
                   shard: Tuple[int, int] = (0, 1), limit: Optional[int] = None):
    """(tf.data of episodes, decode): the reading half of step_stream, for episode-level maps.

    Each element is one record's standardised columns (layouts.COLUMN_KEYS, plus 'mc_return'
    where stored), each (N, ...), images still encoded; `decode(encoded) -> uint8 (H, W, 3)`
    decodes one frame (resized to image_size). shuffle: shard files in a seeded random order
    (records stay in file order without it). shard (index, count): only the records
    [index * n // count, (index + 1) * n // count) of the split's n, read as a TFDS split slice,
    so `count` readers (one per torchrun rank) see disjoint episodes. limit: n is at most this
    (the split's first `limit` records, in file order, are the ones sharded and read).
    Raises as check_dataset, and ValueError when there are fewer records than shards.
    """
    layout = get_layout(layout)
    builder = check_dataset(directory, split, layout)
    decode = _image_decoder(builder, layout, image_size)
    has_mc_return = spec.step_feature(builder.info.features, spec.MC_RETURN) is not None
    index, count = (int(v) for v in shard)
    if not 0 <= index < count:
        raise ValueError(f'shard must be (index, count) with 0 <= index < count, got {shard}')
    total = int(builder.info.splits[split].num_examples)
    if limit is not None:
        total = min(total, int(limit))
    if total < count:
        raise ValueError(f'{directory} [{split}]: {total} episodes to read, fewer than the '
                         f'{count} shards (readers) asked for')
    read = split
    if count > 1 or total < int(builder.info.splits[split].num_examples):
        read = f'{split}[{index * total // count}:{(index + 1) * total // count}]'
    ds = _read_episodes(builder, read, shuffle, seed)
    return _map(ds, lambda raw: _columns(raw[spec.STEPS], layout, has_mc_return)[0]), decode


def iter_steps(directory: PathLike, split: str = 'train',
               **options) -> Iterator[Dict[str, np.ndarray]]:
    """Batches of decoded steps as numpy, the training-data pipeline; options as step_dataset.

    Each batch (B = batch_size; the last is smaller unless drop_remainder):
        'image_primary' uint8 (B, H, W, 3), 'state' float32 (B, 7), 'action' float32 (B, 7),
        'reward', 'discount' float32 (B,), 'is_first', 'is_last', 'is_terminal' bool (B,),
        'language_instruction' object (B,) of str, 'mc_return' float32 (B,) where stored.
    The directory is checked before this returns; arrays are writable copies.
    """
    ds = step_dataset(directory, split, **options)
    return numpy_batches(ds, f'{directory} [{split}]')


def _read_episodes(builder, split: str, shuffle: bool, seed: Optional[int]):
    """Raw episode records: steps as stacked (N, ...) tensors, images still encoded strings."""
    _, tfds = import_tf()
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, enable_ordering_guard=False,
        interleave_cycle_length=16 if shuffle else 1)  # 1 keeps records in file order
    # Skipping the steps decoder yields each episode's parsed steps in one go (a tensor per
    # feature) instead of a nested per-step dataset; images are decoded by us, later.
    return builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                              decoders={spec.STEPS: tfds.decode.SkipDecoding()})


def _map(ds, fn, **options):
    """ds.map(fn, **options) without AutoGraph: our map functions are plain graph code."""
    tf, _ = import_tf()
    return ds.map(tf.autograph.experimental.do_not_convert(fn), **options)


def _columns(steps, layout: Layout, has_mc_return: bool):
    """Stacked step tensors of one record -> {step key: (N, ...)}, standardised by `layout`.

    A record whose steps carry no is_last at all is an episode clipped when its dataset was cut
    down (every episode of the Bridge debug sample): its final step gets is_last and
    is_terminal stays as stored (a truncation). Returns (columns, that repair's bool flag).
    """
    tf, _ = import_tf()
    columns = layout.columns(steps)
    if has_mc_return:
        columns[MC_RETURN_KEY] = lookup(steps, spec.MC_RETURN)
    is_last = columns['is_last']
    clipped = tf.logical_not(tf.reduce_any(is_last))
    final = tf.equal(tf.range(tf.size(is_last)), tf.size(is_last) - 1)
    columns['is_last'] = tf.logical_or(is_last, tf.logical_and(clipped, final))
    return columns, clipped


def _image_decoder(builder, layout: Layout, image_size: Optional[Tuple[int, int]]):
    """fn(encoded JPEG/PNG string) -> uint8 (H, W, 3), resized when image_size differs."""
    tf, _ = import_tf()
    stored = tuple(spec.step_feature(builder.info.features, layout.image).shape)
    target = None if image_size is None else tuple(int(s) for s in image_size)
    resize = target is not None and target != stored[:2]

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        if not resize:
            return tf.ensure_shape(image, stored)  # a frame off the declared shape fails here
        resized = tf.image.resize(image, target, method='bilinear', antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    return decode


def _as_numpy(ds, source: str) -> Iterator[Any]:
    """Iterate a tf.data pipeline as numpy; TF read errors become ValueError naming source."""
    tf, _ = import_tf()
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise ValueError(f'{source}: reading failed: {e.message}') from e
        yield element


def _yield_episodes(ds, source: str) -> Iterator[Episode]:
    for index, columns in enumerate(_as_numpy(ds, source)):
        episode = _to_episode(columns)
        try:
            episode.validate()
        except ValueError as e:
            raise ValueError(f'{source} episode {index}: {e}') from e
        yield episode


def _to_episode(columns: Mapping[str, Any]) -> Episode:
    # np.array copies: arrays out of TF are read-only views of its buffers.
    arrays = {field: np.array(columns[key]) for key, field in _EPISODE_FIELDS.items()
              if key in columns}
    instructions = columns['language_instruction']
    metadata = _metadata(columns['metadata'])
    if columns[IS_LAST_ADDED]:
        metadata[IS_LAST_ADDED] = True
    return Episode(**arrays,
                   language_instruction=_python(instructions[0]) if len(instructions) else '',
                   metadata=metadata)


def _metadata(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """episode_metadata as Python values; our metadata_json is parsed into the dict."""
    out = {key: _python(value) for key, value in raw.items() if key != spec.METADATA_JSON}
    if spec.METADATA_JSON in raw:
        out.update(json.loads(raw[spec.METADATA_JSON].decode('utf-8')))
    return out


def _python(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _metadata(value)
    if isinstance(value, bytes):
        return value.decode('utf-8', errors='replace')
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def numpy_batches(ds, source: str) -> Iterator[Dict[str, np.ndarray]]:
    """A batched step pipeline as writable numpy dicts, instructions as str; read errors
    become ValueError naming `source`."""
    for batch in _as_numpy(ds, source):
        out = {key: np.array(value) for key, value in batch.items()}
        out['language_instruction'] = np.array(
            [s.decode('utf-8', errors='replace') for s in batch['language_instruction']],
            dtype=object)
        yield out


# -------------------------------------------------------------------------------- statistics

NORMALISATIONS = ('bounds', 'normal')
"""'bounds': p01..p99 mapped onto [-1, 1] and clipped (OpenVLA's bounds_q99); 'normal':
(x - mean) / std (Octo's). Dimensions that never vary pass through unchanged."""
_FLAT = 1e-8


@dataclasses.dataclass(frozen=True)
class ActionStats:
    """Per-dimension statistics of a split's actions (or states); each array float64 (dim,).

    std is the population standard deviation; p01/p99 are the 1st/99th percentiles (numpy's
    default linear interpolation). Normalisers (normalise / unnormalise) are built from these.
    """

    mean: np.ndarray
    std: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    p01: np.ndarray
    p99: np.ndarray
    num_steps: int

    @classmethod
    def from_actions(cls, actions: np.ndarray) -> 'ActionStats':
        """Statistics over the N rows of actions (N, dim), computed in float64."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f'actions must be a non-empty (N, dim) array, got shape {a.shape}')
        p01, p99 = np.percentile(a, [1.0, 99.0], axis=0)
        return cls(mean=a.mean(axis=0), std=a.std(axis=0), minimum=a.min(axis=0),
                   maximum=a.max(axis=0), p01=p01, p99=p99, num_steps=int(a.shape[0]))

    def to_dict(self) -> Dict[str, Any]:
        """{'mean', 'std', 'minimum', 'maximum', 'p01', 'p99': list of floats, 'num_steps'}."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ActionStats':
        names = [f.name for f in dataclasses.fields(cls)]
        missing = set(names) - set(d)
        if missing:
            raise ValueError(f'ActionStats dict is missing {sorted(missing)}')
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in names if k != 'num_steps'},
                   num_steps=int(d['num_steps']))

    def normalise(self, x: np.ndarray, mode: str = 'bounds',
                  mask: Optional[np.ndarray] = None) -> np.ndarray:
        """x (..., dim) -> normalised float32 (see NORMALISATIONS); mask (dim,) bool picks the
        dimensions to normalise (the rest, e.g. a 0/1 gripper, pass through)."""
        offset, scale, keep = self.affine(mode, mask)
        self._check_dim(x)
        out = (np.asarray(x, np.float64) - offset) / scale
        if mode == 'bounds':
            out = np.clip(out, -1.0, 1.0)
        return np.where(keep, x, out).astype(np.float32)

    def unnormalise(self, y: np.ndarray, mode: str = 'bounds',
                    mask: Optional[np.ndarray] = None) -> np.ndarray:
        """The inverse of normalise (exact inside p01..p99 for 'bounds'); float32."""
        offset, scale, keep = self.affine(mode, mask)
        self._check_dim(y)
        out = np.asarray(y, np.float64) * scale + offset
        return np.where(keep, y, out).astype(np.float32)

    def affine(self, mode: str = 'bounds', mask: Optional[np.ndarray] = None
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset, scale, pass-through dims): normalised = (x - offset) / scale where not
        passed through ('bounds' also clips to [-1, 1]); scale is 1 on pass-through dims."""
        if mode not in NORMALISATIONS:
            raise ValueError(f'normalisation mode must be one of {NORMALISATIONS}, got {mode!r}')
        dim = self.mean.shape[0]
        if mode == 'bounds':
            offset, scale = (self.p99 + self.p01) / 2, (self.p99 - self.p01) / 2
        else:
            offset, scale = self.mean, self.std
        keep = scale < _FLAT
        if mask is not None:
            keep = keep | ~np.asarray(mask, bool).reshape(dim)
        return offset, np.where(keep, 1.0, scale), keep

    def _check_dim(self, x) -> None:
        if np.shape(x)[-1:] != self.mean.shape:
            raise ValueError(f'expected (..., {self.mean.shape[0]}) values, got shape '
                             f'{np.shape(x)}')


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What normalising a dataset's actions and states needs (cached beside the data)."""

    action: ActionStats
    state: ActionStats
    num_episodes: int

    def to_dict(self) -> Dict[str, Any]:
        return {'stats': self.action.to_dict(), 'state_stats': self.state.to_dict(),
                'num_episodes': self.num_episodes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'DatasetStats':
        missing = {'stats', 'state_stats', 'num_episodes'} - set(d)
        if missing:
            raise ValueError(f'DatasetStats dict is missing {sorted(missing)}')
        return cls(ActionStats.from_dict(d['stats']), ActionStats.from_dict(d['state_stats']),
                   int(d['num_episodes']))


def compute_dataset_stats(directory: PathLike, split: str = 'train', *,
                          layout: LayoutLike = 'bridge', cache: bool = True) -> DatasetStats:
    """Action and state statistics of one split (standardised by `layout`), computed once.

    Cached in `<directory>/action_stats.json` ({split: {'num_examples', 'num_bytes', 'layout',
    **DatasetStats.to_dict()}}), reused only while dataset_info.json gives the split the same
    size and the layout is the same. The cache is written atomically, and not at all where the
    directory is read-only. Raises as check_dataset.
    """
    layout = get_layout(layout)
    builder = check_dataset(directory, split, layout)
    info = builder.info.splits[split]
    key = {'num_examples': int(info.num_examples), 'num_bytes': int(info.num_bytes),
           'layout': layout.name}
    path = Path(directory) / STATS_FILE
    entries = _read_json(path) if cache else {}
    entry = entries.get(split)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()):
        try:
            return DatasetStats.from_dict(entry)
        except ValueError:
            pass  # an entry of an older format: recomputed below

    def actions_and_states(raw):
        columns = layout.columns(raw[spec.STEPS])
        return columns['action'], columns[STATE_KEY]

    ds = _map(_read_episodes(builder, split, shuffle=False, seed=None), actions_and_states)
    chunks = list(_as_numpy(ds, f'{directory} [{split}]'))
    empty = np.zeros((0, ACTION_DIM), np.float32)
    stats = DatasetStats(
        action=ActionStats.from_actions(np.concatenate([a for a, _ in chunks]) if chunks
                                        else empty),
        state=ActionStats.from_actions(np.concatenate([s for _, s in chunks]) if chunks
                                       else empty),
        num_episodes=len(chunks))
    if cache:
        entries[split] = dict(key, **stats.to_dict())
        _write_json(path, entries)
    return stats


def compute_action_stats(directory: PathLike, split: str = 'train', *,
                         layout: LayoutLike = 'bridge', cache: bool = True) -> ActionStats:
    """The action part of compute_dataset_stats (same cache)."""
    return compute_dataset_stats(directory, split, layout=layout, cache=cache).action


def _read_json(path: Path) -> Dict[str, Any]:
    """The JSON object in path; {} when absent or unreadable (the cache is then rebuilt)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename); skipped where the directory is read-only."""
    tmp = path.with_name(f'.{path.name}.tmp-{uuid.uuid4().hex}')
    try:
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)
    except OSError:
        # Shared and published datasets are often read-only: the stats are recomputed instead.
        tmp.unlink(missing_ok=True)
