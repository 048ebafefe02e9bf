"""The Bridge-compatible RLDS step spec: feature names, the TFDS features we write, the check.

An RLDS dataset holds one record per episode: `steps`, a nested dataset with one element per
step, and `episode_metadata`. The step features every reader here needs (Bridge / Open
X-Embodiment names) are:

    steps/observation/image_0   Image uint8 (H, W, 3)   primary camera, JPEG or PNG
    steps/observation/state     Tensor float32 (7,)     end-effector state
    steps/action                Tensor float32 (7,)
    steps/reward, steps/discount                Scalar float32
    steps/is_first, steps/is_last, steps/is_terminal   Scalar bool
    steps/language_instruction  Text
    steps/mc_return             Scalar float32          optional (our datasets, when computed)

Extra features (more cameras, language embeddings) are allowed and ignored.

TensorFlow is imported only through `import_tf()`, never at module import time: loading it
before MuJoCo's first render crashes the process (its LLVM symbols clash with Mesa llvmpipe).
"""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from robot_rl.types import ACTION_DIM, STATE_DIM

FeatureSpec = Tuple[str, Tuple[Optional[int], ...], Any]
"""(feature kind 'Image' | 'Tensor' | 'Text', shape with None for any size, numpy dtype)."""

STEPS = 'steps'
EPISODE_METADATA = 'episode_metadata'
METADATA_JSON = 'metadata_json'
"""Text feature under episode_metadata holding json.dumps(Episode.metadata)."""

IMAGE = 'observation/image_0'
STATE = 'observation/state'
ACTION = 'action'
REWARD = 'reward'
DISCOUNT = 'discount'
IS_FIRST = 'is_first'
IS_LAST = 'is_last'
IS_TERMINAL = 'is_terminal'
LANGUAGE = 'language_instruction'
MC_RETURN = 'mc_return'

IMAGE_FORMATS = ('jpeg', 'png')

# Step feature path -> (feature kind, shape, dtype); None in a shape matches any size.
REQUIRED_STEP_FEATURES: Mapping[str, FeatureSpec] = {
    IMAGE: ('Image', (None, None, 3), np.uint8),
    STATE: ('Tensor', (STATE_DIM,), np.float32),
    ACTION: ('Tensor', (ACTION_DIM,), np.float32),
    REWARD: ('Tensor', (), np.float32),
    DISCOUNT: ('Tensor', (), np.float32),
    IS_FIRST: ('Tensor', (), np.bool_),
    IS_LAST: ('Tensor', (), np.bool_),
    IS_TERMINAL: ('Tensor', (), np.bool_),
    LANGUAGE: ('Text', (), np.object_),
}
OPTIONAL_STEP_FEATURES: Mapping[str, FeatureSpec] = {
    MC_RETURN: ('Tensor', (), np.float32),
}


def import_tf():
    """Import (tensorflow, tensorflow_datasets) on first use, with TF's C++ logs quietened."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    import tensorflow_datasets as tfds
    return tf, tfds


def make_features(image_shape: Tuple[int, int, int], image_format: str = 'jpeg',
                  with_mc_return: bool = False):
    """The tfds FeaturesDict we write: the required steps (+ mc_return) and metadata JSON.

    image_shape: (H, W, 3) of every observation.image_0; image_format: 'jpeg' or 'png'.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got {image_format!r}')
    _, tfds = import_tf()
    feats = tfds.features

    def scalar(dtype, doc):
        return feats.Scalar(dtype=dtype, doc=doc)

    steps = {
        'observation': {
            'image_0': feats.Image(shape=tuple(image_shape), dtype=np.uint8,
                                   encoding_format=image_format, doc='Primary camera RGB.'),
            'state': feats.Tensor(shape=(STATE_DIM,), dtype=np.float32,
                                  doc='End effector [x, y, z, roll, pitch, yaw, gripper].'),
        },
        ACTION: feats.Tensor(shape=(ACTION_DIM,), dtype=np.float32,
                             doc='[dx, dy, dz, droll, dpitch, dyaw, gripper], gripper 1 = open.'),
        REWARD: scalar(np.float32, '0 on the step reaching success, -1 otherwise.'),
        DISCOUNT: scalar(np.float32, 'Discount, 1 unless set.'),
        IS_FIRST: scalar(np.bool_, 'True on the first step of the episode.'),
        IS_LAST: scalar(np.bool_, 'True on the last step of the episode.'),
        IS_TERMINAL: scalar(np.bool_, 'True on a last step that ended the task (success).'),
        LANGUAGE: feats.Text(doc='Language instruction.'),
    }
    if with_mc_return:
        steps[MC_RETURN] = scalar(np.float32, 'Monte-Carlo return-to-go.')
    return feats.FeaturesDict({
        STEPS: feats.Dataset(steps),
        EPISODE_METADATA: {METADATA_JSON: feats.Text(doc='JSON of Episode.metadata.')},
    })


def step_feature(features, path: str):
    """The feature at `path` ('observation/state') inside steps, or None where absent."""
    node = features[STEPS].feature
    for key in path.split('/'):
        if not hasattr(node, 'keys') or key not in node.keys():
            return None
        node = node[key]
    return node


def check_features(features, source: str,
                   required: Mapping[str, FeatureSpec] = REQUIRED_STEP_FEATURES,
                   optional: Mapping[str, FeatureSpec] = OPTIONAL_STEP_FEATURES,
                   layout: str = 'bridge') -> None:
    """Raise ValueError naming every required step feature that is missing or mis-specified.

    features: a tfds FeaturesDict (builder.info.features); source names the dataset in messages.
    required / optional: the layout's step features (robot_rl.data.layouts); optional ones are
    checked only where present. Messages name the source and the layout.
    """
    _, tfds = import_tf()
    where = f'{source} (layout {layout!r})'
    steps = features[STEPS] if STEPS in features.keys() else None
    if not isinstance(steps, tfds.features.Dataset):
        raise ValueError(f'{where}: missing required feature {STEPS!r} (an RLDS nested '
                         f'Dataset of steps); features: {sorted(features.keys())}')
    problems = []
    for path, spec in required.items():
        problems += _problems(step_feature(features, path), path, spec, required=True)
    for path, spec in optional.items():
        problems += _problems(step_feature(features, path), path, spec, required=False)
    if problems:
        raise ValueError(f'{where}: ' + '; '.join(problems))


def _problems(feature, path: str, spec, required: bool) -> List[str]:
    """[] when `feature` matches spec (kind, shape, dtype), else one message naming it."""
    kind, shape, dtype = spec
    name = f'{STEPS}/{path}'
    if feature is None:
        missing = f'missing required feature {name} ({_describe(kind, shape, dtype)})'
        return [missing] if required else []
    _, tfds = import_tf()
    cls = {'Image': tfds.features.Image, 'Text': tfds.features.Text,
           'Tensor': tfds.features.Tensor}[kind]
    if isinstance(feature, tfds.features.FeaturesDict):  # e.g. RT-1's dictionary action
        return [f'feature {name} is a FeaturesDict with keys {sorted(feature.keys())}, '
                f'expected {_describe(kind, shape, dtype)}']
    actual = _describe(type(feature).__name__, feature.shape, feature.np_dtype)
    if (not isinstance(feature, cls) or not _shape_matches(feature.shape, shape)
            or np.dtype(feature.np_dtype) != np.dtype(dtype)):
        return [f'feature {name} is {actual}, expected {_describe(kind, shape, dtype)}']
    # The readers take tensors as parsed, so they must be stored unencoded (no zlib/bytes).
    if kind == 'Tensor' and feature.get_serialized_info() != feature.get_tensor_info():
        return [f'feature {name} is stored encoded ({feature.get_serialized_info()}); only '
                'unencoded tensors are supported']
    return []


def _shape_matches(actual: Optional[Sequence[Any]], expected: Sequence[Any]) -> bool:
    if actual is None or len(actual) != len(expected):
        return False
    return all(e is None or a == e for a, e in zip(actual, expected))


def _describe(kind: str, shape, dtype) -> str:
    shape = tuple(shape) if shape is not None else None
    return f'{kind} shape={shape} dtype={np.dtype(dtype).name}'
