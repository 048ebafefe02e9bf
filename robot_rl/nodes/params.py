"""Every node's declared parameters, as data (no rclpy): one source for the nodes and the T0
launch/parameter-file checks. `robot_rl.nodes.ros_common.declare_all` turns each ParamSpec into
`declare_parameter(name, default, ParameterDescriptor(...))`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    min: Optional[float] = None
    max: Optional[float] = None
    read_only: bool = False


P = ParamSpec
_RATE = P('control_rate_hz', 5.0, 'Control rate (Hz); Bridge policies act at 5 Hz.', 0.5, 50.0)
_HYDRA = [
    P('config_name', 'online', 'Hydra config (configs/<name>.yaml) composed with the hydra '
      'compose API; its policy.* section overrides policy.name/kwargs_json. Empty = none.',
      read_only=True),
    P('config_overrides', [''], 'Hydra overrides, e.g. ["policy.kwargs.hidden=128"].',
      read_only=True),
]
_POLICY_MODEL = [
    P('policy.name', 'tiny_mlp', 'Registered policy name (policies.base.POLICIES).',
      read_only=True),
    P('policy.kwargs_json', '{}', 'JSON object of policy constructor arguments.',
      read_only=True),
]

NODE_PARAMS: Dict[str, List[ParamSpec]] = {
    'sim': [
        P('task', 'spoon_on_towel', 'Simulated task (robot_rl.envs.TASKS).', read_only=True),
        P('image_size', 128, 'Camera pixels per side.', 64, 256, read_only=True),
        P('max_episode_steps', 0, "Truncate episodes after this many steps (0 = the task's "
          'own limit).', 0, 10000),
        P('seed', 0, 'Seed of the first episode; episode k uses seed + k.', 0, 2 ** 31 - 1),
        P('auto_reset', True, 'Start a new episode when one ends.'),
        _RATE,
        P('frame_id', 'camera', 'frame_id of the camera images.'),
        P('jpeg_quality', 90, 'JPEG quality of the compressed image topic.', 1, 100),
    ],
    'policy': _HYDRA + _POLICY_MODEL + [
        P('policy.checkpoint', '', 'Initial weights (.safetensors with JSON sidecar); empty '
          "= the policy's own initialisation.", read_only=True),
        _RATE,
        P('device', 'cpu', 'Torch device for inference (cpu, cuda, auto).', read_only=True),
        P('steering.num_samples', 1, 'Candidate action chunks sampled per step (K); with a '
          'critic the best-scoring one runs (V-GPS), without one a random one.', 1, 256),
        P('steering.critic_checkpoint', '', 'Critic for V-GPS: a robot-rl-train-critic '
          'checkpoint directory (its target critic) or a critic .safetensors; empty = none.',
          read_only=True),
        P('steering.ensemble_checkpoints', [''], 'More critics (e.g. other training seeds) '
          'scored with steering.critic_checkpoint: a candidate scores the mean of their '
          'min-over-heads Q.', read_only=True),
        P('steering.temperature', 0.0, 'Selection temperature: 0 = argmax of Q, > 0 = sample '
          'softmax(Q / temperature).', 0.0, 100.0),
        P('steering.scoring', 'first_action', "What the critic scores: 'first_action' of each "
          "chunk (V-GPS) or the whole 'chunk' (mean Q of its actions at the frame).",
          read_only=True),
        P('actor_id', '', 'Name of this actor in transition batches (empty = node name + '
          'process id).', read_only=True),
        P('transitions.enabled', True, 'Publish transitions for the learner.'),
        P('transitions.batch_steps', 4, 'Steps per transition message (an episode end '
          'flushes early).', 1, 256),
        P('transitions.history_depth', 1000, 'Transition messages kept for late-joining or '
          'restarted learners (reliable, transient local).', 1, 100000, read_only=True),
        P('transitions.image_format', 'jpeg', 'Frame encoding on the wire: jpeg or png.'),
        P('default_instruction', '', 'Instruction used until one arrives on the topic.'),
        P('teleop_timeout_s', 0.5, 'While a person has taken over, a teleop device silent for '
          'longer than this is lost: the arm holds (never back to the policy on its own).',
          0.05, 10.0),
    ],
    'learner': _HYDRA + _POLICY_MODEL + [
        P('replay_dir', 'learner/replay', 'On-disk replay buffer directory.', read_only=True),
        P('checkpoint_dir', 'learner/checkpoints', 'Checkpoint directory (resumed from).',
          read_only=True),
        P('batch_size', 32, 'Replay batch size per update.', 1, 4096),
        P('lr', 1e-3, 'Adam learning rate.', 1e-7, 1.0),
        P('min_transitions', 4, 'Transitions in replay before updates start.', 1, 10 ** 9),
        P('publish_every', 10, 'Publish a new weight version every N updates.', 1, 10 ** 6),
        P('update_rate_hz', 10.0, 'Rate of the update timer (Hz).', 0.1, 1000.0),
        P('updates_per_tick', 1, 'Gradient steps per timer tick.', 0, 1000),
        P('device', 'auto', 'Torch device: auto (cuda when present), cpu or cuda.',
          read_only=True),
        P('seed', 0, 'Seed of replay sampling.', 0, 2 ** 31 - 1),
        P('transitions.history_depth', 1000, 'Depth requested on the transitions topic '
          '(transient local: a restarted learner receives what it missed).', 1, 100000,
          read_only=True),
        P('finetune.policy_checkpoint', '', 'Pre-trained policy (robot-rl-train-bc '
          '.safetensors): PA-RL fine-tuning; empty = behaviour cloning of policy.name.',
          read_only=True),
        P('finetune.critic_checkpoint', '', 'Cal-QL critic for PA-RL: a robot-rl-train-critic '
          'checkpoint directory or a critic .safetensors.', read_only=True),
        P('finetune.run_dir', 'learner/finetune', 'PA-RL run directory (replay, checkpoints, '
          'curve.jsonl; resumed from).', read_only=True),
        P('finetune.overrides', [''], 'Hydra overrides of configs/finetune.yaml, e.g. '
          '["learner.batch_size=64", "learner.updates_per_step=2"].', read_only=True),
    ],
    'recorder': [
        P('output_dir', 'recordings', 'Directory for the RLDS dataset and the MCAP bag.',
          read_only=True),
        P('dataset_name', 'robot_rl_episodes', 'TFDS dataset name (lower case).',
          read_only=True),
        P('rlds', True, 'Write closed episodes as a Bridge-format RLDS dataset.'),
        P('bag', True, 'Record the camera, action, event and instruction topics to MCAP.'),
        P('image_format', 'jpeg', 'RLDS image encoding: jpeg or png.'),
        P('flush_period_s', 1.0, 'How often closed episodes are written out (s).', 0.05, 600.0),
        P('label_grace_s', 2.0, 'A closed episode waits this long for a late label before it '
          'is appended to the RLDS dataset (s).', 0.0, 600.0),
    ],
    'widowx': [
        P('robot_model', 'wx250s', 'Interbotix robot name (topic namespace /<robot>/...).',
          read_only=True),
        P('command_interface', 'interbotix', 'interbotix (JointGroupCommand + '
          'JointSingleCommand) or trajectory (trajectory_msgs/JointTrajectory).',
          read_only=True),
        P('trajectory_topic', '/arm_controller/joint_trajectory', 'JointTrajectory topic '
          'of the ros2_control joint trajectory controller.', read_only=True),
        _RATE,
        P('max_joint_step', 0.35, 'Largest joint change per control step (rad).', 0.01, 3.0),
        P('ik_damping', 0.05, 'Damped-least-squares lambda.', 0.001, 1.0),
        P('workspace_low', [0.12, -0.25, 0.015, -0.8, -0.8, -2.0], 'End-effector target '
          'lower bounds [x, y, z (m), roll, pitch, yaw (rad)].', read_only=True),
        P('workspace_high', [0.45, 0.25, 0.25, 0.8, 0.8, 2.0], 'End-effector target upper '
          'bounds.', read_only=True),
        P('home_timeout_s', 15.0, 'The home service answers failure when the measured joints '
          'are not within home_tolerance_rad of the home pose after this long (s); keep it '
          "below the episode manager's reset_timeout_s.", 0.1, 600.0),
        P('home_tolerance_rad', 0.05, 'Largest measured joint error at which the arm counts as '
          'home (rad).', 0.001, 0.5),
    ],
    'episode_manager': [
        P('instruction', '', 'Instruction published on the instruction topic for every episode '
          '(empty = use the one heard on that topic, e.g. the one the sim publishes).'),
        P('max_episode_steps', 60, 'End an episode unlabelled after this many executed steps '
          '(0 = no limit); a late label may follow.', 0, 100000),
        P('late_label_window_s', 10.0, 'How long after an unlabelled end a label still applies '
          '(s); after it the episode closes as a failure.', 0.0, 3600.0),
        P('reset_timeout_s', 20.0, 'The reset routine (arm to its home pose) fails after this '
          'long (s).', 0.1, 600.0),
        P('reset_service', 'reset', 'std_srvs/Trigger service that brings the scene and arm '
          'home before each episode (the sim provides "reset"); empty = no routine.'),
        P('auto_start', False, 'Start the next episode as soon as one ends.'),
        P('keyboard', True, 'Read keys from stdin when it is a terminal (run it in its own '
          'SSH session or tmux pane); the episode/command topic works either way.'),
        P('control_rate_hz', 5.0, 'Rate of keyboard teleop actions and status updates (Hz).',
          0.5, 50.0),
        P('teleop.step_m', 0.01, 'Keyboard teleop: translation per key press (m).', 0.001,
          0.05),
        P('teleop.step_rad', 0.1, 'Keyboard teleop: yaw per key press (rad).', 0.01, 0.25),
        P('classifier_path', '', 'Success classifier (robot-rl-train-reward .safetensors) that '
          'labels episodes from the camera (camera/image_raw); empty = off, a person labels.',
          read_only=True),
        P('classifier_confidence', 0.8, 'The classifier labels when max(p, 1 - p) is at least '
          'this; below it a person is asked.', 0.5, 1.0, read_only=True),
        P('classifier_check_every_steps', 0, 'While an episode runs, look every this many '
          'executed steps and end it on a confident success (0 = only the final frame).', 0,
          100000, read_only=True),
        P('classifier_language_model', '', 'Local sentence-encoder directory of the '
          "classifier's instruction embeddings (empty = the bundled MiniLM).", read_only=True),
    ],
    'spacemouse': [
        P('device_path', '/dev/hidraw0', 'hidraw device of the 3Dconnexion SpaceMouse (see '
          'ls -l /dev/hidraw* and the device names in /sys/class/hidraw/*/device/uevent).',
          read_only=True),
        P('control_rate_hz', 10.0, 'teleop/action rate (Hz). Each action is one robot step '
          "and the policy node runs the latest, so keep it above the policy's control rate "
          '(2x: every step finds a fresh one) and its period below teleop_timeout_s.', 0.5,
          50.0, read_only=True),
        P('read_rate_hz', 100.0, 'How often waiting HID reports are read (Hz); the devices '
          'send about 60 a second while moved.', 5.0, 1000.0, read_only=True),
        P('full_scale', 350.0, 'Raw axis value at full deflection.', 1.0, 32767.0,
          read_only=True),
        P('deadzone', 0.1, 'Deflections below this fraction of full scale count as zero.',
          0.0, 0.9, read_only=True),
        P('translation_scale', 0.4, 'Full deflection moves this fraction of the per-step '
          'translation bound (5 cm).', 0.01, 1.0, read_only=True),
        P('rotation_scale', 0.4, 'Full deflection turns this fraction of the per-step '
          'rotation bound (0.25 rad).', 0.01, 1.0, read_only=True),
        P('axis_map', [-2, -1, -3, 0, 0, -6], 'Robot axes x, y, z, roll, pitch, yaw from '
          'signed device axes 1..6 = X right, Y toward the user, Z down, Rx, Ry, Rz (0 = off); '
          'the default suits a person behind the arm (robot_rl.episodes.spacemouse).',
          read_only=True),
        P('gripper_button', 0, 'Button (bit of the button report) whose press toggles the '
          'gripper.', 0, 63, read_only=True),
    ],
    'camera': [
        P('device', '0', 'OpenCV capture source: a device index ("0") or a path/URL.',
          read_only=True),
        P('width', 640, 'Requested capture width (px).', 16, 8192, read_only=True),
        P('height', 480, 'Requested capture height (px).', 16, 8192, read_only=True),
        P('output_size', 256, 'Published square image size (px; 0 = as captured).', 0, 4096),
        P('rate_hz', 10.0, 'Publish rate (Hz).', 0.5, 120.0),
        P('frame_id', 'camera', 'frame_id of the published images.'),
        P('jpeg_quality', 90, 'JPEG quality of the compressed topic.', 1, 100),
    ],
}


def declared_names(node: str) -> List[str]:
    return [p.name for p in NODE_PARAMS[node]]
