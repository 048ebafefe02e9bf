"""RLDS feature layouts and their standardisation to the project's step format.

Open X-Embodiment datasets share the RLDS episode/steps structure but name and shape their
features per robot. A Layout says which step features a dataset must declare and turns one
episode's stacked step tensors into the common columns that every reader yields:

    image_primary  encoded image string (N,)  decoded and resized later by the reader
    state          float32 (N, 7)  [x, y, z, roll, pitch, yaw, gripper], gripper 1 = open
    action         float32 (N, 7)  [dx, dy, dz, droll, dpitch, dyaw, gripper], gripper 1 = open
    reward, discount float32 (N,); is_first, is_last, is_terminal bool (N,)
    language_instruction  string (N,)

Registered layouts (LAYOUTS): 'bridge' (Bridge v2 and our own datasets, bridge_spec) and
'fractal' (RT-1, fractal20220817_data). The readers in rlds take `layout=<name>`; a dataset
whose declared features do not match its layout fails before any record is read, naming the
dataset and the feature.

How to add a dataset with a new layout: write a `standardise(steps) -> columns` function in
TensorFlow graph code (steps is the nested dict of one episode's step tensors as stored, each
(N, ...), images still encoded), list the features it reads in `required` (and the ones it
tolerates but ignores in `optional`), and call `register_layout(Layout(...))` here. Then point
a data source at the directory with `layout: <name>` (configs/data/oxe_mix.yaml).
TensorFlow is imported only when a layout is used (bridge_spec.import_tf).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from robot_rl.data import bridge_spec as spec
from robot_rl.data.bridge_spec import FeatureSpec, import_tf
from robot_rl.types import ACTION_DIM, IMAGE_KEY, STATE_DIM, STATE_KEY

Columns = Dict[str, Any]
"""Common step key -> stacked tensor (N, ...) of one episode (tf.Tensor)."""

COLUMN_KEYS = (IMAGE_KEY, STATE_KEY, 'action', 'reward', 'discount', 'is_first', 'is_last',
               'is_terminal', 'language_instruction')


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family of RLDS datasets stores its steps, and how to standardise them."""

    name: str
    """Registry key, the `layout` of a data source."""
    required: Mapping[str, FeatureSpec]
    """Step feature path ('observation/state') -> (kind, shape, dtype) the dataset must declare."""
    optional: Mapping[str, FeatureSpec]
    """Features checked only where present (read by standardise when there, or ignored)."""
    image: str
    """Path of the encoded primary camera feature (decoded by the reader, after shuffling)."""
    standardise: Callable[[Mapping[str, Any]], Columns]
    """One episode's raw step tensors (nested dict, each (N, ...)) -> COLUMN_KEYS columns."""
    description: str = ''

    def check(self, features, source: str) -> None:
        """ValueError naming `source`, this layout and every mis-declared feature."""
        spec.check_features(features, source, self.required, self.optional, layout=self.name)

    def columns(self, steps: Mapping[str, Any]) -> Columns:
        """standardise(steps) checked to yield exactly COLUMN_KEYS."""
        out = self.standardise(steps)
        if set(out) != set(COLUMN_KEYS):
            raise ValueError(f'layout {self.name!r}: standardise returned {sorted(out)}, '
                             f'expected {sorted(COLUMN_KEYS)}')
        return out


LAYOUTS: Dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    if layout.name in LAYOUTS:
        raise ValueError(f'layout {layout.name!r} is already registered')
    if layout.image not in layout.required:
        raise ValueError(f'layout {layout.name!r}: image feature {layout.image!r} must be '
                         'required')
    LAYOUTS[layout.name] = layout
    return layout


def get_layout(layout) -> Layout:
    """A Layout, or the registered one of that name (ValueError listing the names)."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f'unknown dataset layout {layout!r}; registered: {sorted(LAYOUTS)}')
    return LAYOUTS[layout]


def lookup(steps: Mapping[str, Any], path: str):
    """steps['observation']['state'] for path 'observation/state'."""
    node = steps
    for key in path.split('/'):
        node = node[key]
    return node


# ----------------------------------------------------------------------------------- bridge

BRIDGE_PATHS = {IMAGE_KEY: spec.IMAGE, STATE_KEY: spec.STATE, 'action': spec.ACTION,
                'reward': spec.REWARD, 'discount': spec.DISCOUNT, 'is_first': spec.IS_FIRST,
                'is_last': spec.IS_LAST, 'is_terminal': spec.IS_TERMINAL,
                'language_instruction': spec.LANGUAGE}
"""Common step key -> its Bridge step feature path."""


def _standardise_bridge(steps: Mapping[str, Any]) -> Columns:
    """Bridge v2 already is the common format: a lookup by name."""
    return {key: lookup(steps, path) for key, path in BRIDGE_PATHS.items()}


BRIDGE = register_layout(Layout(
    name='bridge', required=spec.REQUIRED_STEP_FEATURES, optional=spec.OPTIONAL_STEP_FEATURES,
    image=spec.IMAGE, standardise=_standardise_bridge,
    description='Bridge v2 (OXE bridge_dataset) and robot_rl datasets: bridge_spec names.'))


# ---------------------------------------------------------------------------------- fractal

FRACTAL_STEP_FEATURES: Dict[str, FeatureSpec] = {
    'observation/image': ('Image', (None, None, 3), np.uint8),
    'observation/natural_language_instruction': ('Text', (), np.object_),
    'observation/base_pose_tool_reached': ('Tensor', (7,), np.float32),
    'observation/gripper_closed': ('Tensor', (1,), np.float32),
    'action/world_vector': ('Tensor', (3,), np.float32),
    'action/rotation_delta': ('Tensor', (3,), np.float32),
    'action/gripper_closedness_action': ('Tensor', (1,), np.float32),
    spec.REWARD: ('Tensor', (), np.float32),
    spec.DISCOUNT: ('Tensor', (), np.float32),
    spec.IS_FIRST: ('Tensor', (), np.bool_),
    spec.IS_LAST: ('Tensor', (), np.bool_),
    spec.IS_TERMINAL: ('Tensor', (), np.bool_),
}
FRACTAL_IGNORED_FEATURES: Dict[str, FeatureSpec] = {
    # The mobile base and the episode-termination head are not part of the 7-d arm action.
    'action/terminate_episode': ('Tensor', (3,), np.int32),
    'action/base_displacement_vector': ('Tensor', (2,), np.float32),
    'action/base_displacement_vertical_rotation': ('Tensor', (1,), np.float32),
}
GRIPPER_THRESHOLD = 0.1
"""|gripper_closedness_action| below this is 'no change' (the Octo/OXE threshold)."""


def absolute_gripper(closedness):
    """RT-1 relative gripper commands (N,) -> absolute gripper (N,) float32, 1 = open, 0 = closed.

    gripper_closedness_action is +1 to close, -1 to open and ~0 to leave the gripper as it is.
    Each step takes the last non-zero command so far; steps before the first command take the
    opposite of that command (an episode's first command changes the gripper), and an episode
    with no command at all is open throughout (the OXE/Octo rel2abs_gripper_actions rule).
    """
    tf, _ = import_tf()
    command = tf.where(closedness < -GRIPPER_THRESHOLD, 1,
                       tf.where(closedness > GRIPPER_THRESHOLD, -1, 0))  # +1 open, -1 close
    steps = tf.range(tf.size(command))
    nonzero = tf.not_equal(command, 0)
    last_index = tf.scan(tf.maximum, tf.where(nonzero, steps, -1), initializer=-1)
    any_command = tf.reduce_any(nonzero)
    first = tf.gather(command, tf.argmax(tf.cast(nonzero, tf.int32), output_type=tf.int32))
    start = tf.where(any_command, -first, 1)
    state = tf.where(last_index >= 0, tf.gather(command, tf.maximum(last_index, 0)), start)
    return tf.cast(state, tf.float32) / 2.0 + 0.5


def quaternion_to_euler(quaternion):
    """(N, 4) quaternions [x, y, z, w] -> (N, 3) [roll, pitch, yaw] (extrinsic x-y-z), float32."""
    tf, _ = import_tf()
    x, y, z, w = tf.unstack(tf.cast(quaternion, tf.float64), axis=-1)
    roll = tf.atan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = tf.asin(tf.clip_by_value(2 * (w * y - z * x), -1.0, 1.0))
    yaw = tf.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return tf.cast(tf.stack([roll, pitch, yaw], axis=-1), tf.float32)


def _standardise_fractal(steps: Mapping[str, Any]) -> Columns:
    """RT-1: dictionary action -> 7-d action; pose + gripper_closed -> 7-d state.

    action = [world_vector, rotation_delta, absolute_gripper(gripper_closedness_action)];
    state = [base_pose_tool_reached xyz, its quaternion (x, y, z, w) as roll/pitch/yaw,
    1 - gripper_closed]. Rewards and flags pass through as stored, as Bridge's do.
    """
    tf, _ = import_tf()
    obs, act = steps['observation'], steps['action']
    gripper = absolute_gripper(act['gripper_closedness_action'][:, 0])
    action = tf.concat([act['world_vector'], act['rotation_delta'], gripper[:, None]], axis=-1)
    pose = obs['base_pose_tool_reached']
    state = tf.concat([pose[:, :3], quaternion_to_euler(pose[:, 3:7]),
                       1.0 - obs['gripper_closed']], axis=-1)
    return {IMAGE_KEY: obs['image'], STATE_KEY: tf.ensure_shape(state, [None, STATE_DIM]),
            'action': tf.ensure_shape(action, [None, ACTION_DIM]),
            'reward': steps[spec.REWARD], 'discount': steps[spec.DISCOUNT],
            'is_first': steps[spec.IS_FIRST], 'is_last': steps[spec.IS_LAST],
            'is_terminal': steps[spec.IS_TERMINAL],
            'language_instruction': obs['natural_language_instruction']}


FRACTAL = register_layout(Layout(
    name='fractal', required=FRACTAL_STEP_FEATURES, optional=FRACTAL_IGNORED_FEATURES,
    image='observation/image', standardise=_standardise_fractal,
    description='RT-1 robot data (OXE fractal20220817_data): dictionary action, any image size.'))


def fractal_features(image_shape: Tuple[int, int, int] = (256, 320, 3)):
    """The tfds FeaturesDict of the fractal20220817_data release (256x320 JPEG frames there).

    Used to write fractal-layout datasets (tests, benchmarks) with TFDS's own serialisation.
    """
    _, tfds = import_tf()
    feats = tfds.features

    def tensor(shape, dtype):
        return feats.Tensor(shape=shape, dtype=dtype)

    observation = {'image': feats.Image(shape=tuple(image_shape), dtype=np.uint8,
                                        encoding_format='jpeg'),
                   'natural_language_instruction': feats.Text()}
    action = {}
    steps: Dict[str, Any] = {'observation': observation, 'action': action}
    for path, (kind, shape, dtype) in {**FRACTAL_STEP_FEATURES,
                                       **FRACTAL_IGNORED_FEATURES}.items():
        if kind != 'Tensor':
            continue
        parent, _, leaf = path.rpartition('/')
        target = {'observation': observation, 'action': action, '': steps}[parent]
        target[leaf] = feats.Scalar(dtype=dtype) if shape == () else tensor(shape, dtype)
    return feats.FeaturesDict({spec.STEPS: feats.Dataset(steps)})


def fractal_record(images: np.ndarray, world_vector: np.ndarray, rotation_delta: np.ndarray,
                   gripper_closedness: np.ndarray, pose: np.ndarray, gripper_closed: np.ndarray,
                   instruction: str, success: bool = True) -> Dict[str, Any]:
    """One episode as the nested example fractal_features() serialises (N steps).

    images uint8 (N, H, W, 3); world_vector, rotation_delta float (N, 3); gripper_closedness
    (N,) in [-1, 1] (+1 = close); pose (N, 7) xyz + quaternion (x, y, z, w); gripper_closed
    (N,) 0/1. Rewards follow RT-1: 1 on the last step of a successful episode, else 0; the
    last step is terminal (terminate_episode one-hot [1, 0, 0] there, [0, 1, 0] before).
    """
    n = len(images)
    last = np.arange(n) == n - 1
    reward = (last & success).astype(np.float32)
    terminate = np.where(last[:, None], [[1, 0, 0]], [[0, 1, 0]]).astype(np.int32)
    return {spec.STEPS: {
        'observation': {
            'image': np.asarray(images, np.uint8),
            'natural_language_instruction': [instruction] * n,
            'base_pose_tool_reached': np.asarray(pose, np.float32).reshape(n, 7),
            'gripper_closed': np.asarray(gripper_closed, np.float32).reshape(n, 1),
        },
        'action': {
            'world_vector': np.asarray(world_vector, np.float32).reshape(n, 3),
            'rotation_delta': np.asarray(rotation_delta, np.float32).reshape(n, 3),
            'gripper_closedness_action': np.asarray(gripper_closedness,
                                                    np.float32).reshape(n, 1),
            'terminate_episode': terminate,
            'base_displacement_vector': np.zeros((n, 2), np.float32),
            'base_displacement_vertical_rotation': np.zeros((n, 1), np.float32),
        },
        spec.REWARD: reward, spec.DISCOUNT: np.ones(n, np.float32),
        spec.IS_FIRST: np.arange(n) == 0, spec.IS_LAST: last, spec.IS_TERMINAL: last.copy(),
    }}
