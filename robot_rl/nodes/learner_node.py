"""learner: transitions in, gradient updates (GPU when present), versioned weights out.

Subscribes:
    transitions     std_msgs/UInt8MultiArray step-batch envelopes (reliable, transient local,
                    depth transitions.history_depth: a restarted learner receives the history)
Publishes:
    weights         std_msgs/UInt8MultiArray weight envelope (reliable, transient local, depth 1)
    learner/status  std_msgs/String JSON {steps_received, episodes, transitions, version,
                    updates, dropped, intervention_transitions} once a second (COMMAND_QOS)
The subscription callback only queues bytes; a timer in its own callback group decodes
(bad envelopes are logged and dropped), stores episodes, updates and publishes. Checkpoints and
replay live on disk; restarting resumes from them.

With finetune.policy_checkpoint and finetune.critic_checkpoint set, the learner is PA-RL on a
Cal-QL critic (robot_rl.rl.finetune.Learner, configured by configs/finetune.yaml's `learner`
section plus finetune.overrides; its weights carry the policy and the critic). Without them it
behaviour-clones the online policy (robot_rl.rl.online_learner), a quick smoke mode.
"""

from __future__ import annotations

import collections
import json
import threading

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String, UInt8MultiArray

from pathlib import Path

from policies.scripted import make_policy
from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, history_qos, LATCHED_QOS,
                                       policy_spec, reject_changes, run)
from robot_rl.rl.finetune import LearnerStopped
from robot_rl.rl.online_learner import OnlineLearner, OnlineLearnerConfig
from robot_rl.transport import decode_steps, EnvelopeError


def pick_device(choice: str) -> str:
    import torch
    if choice == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return choice


class LearnerNode(Node):
    def __init__(self):
        super().__init__('learner')
        self.p = declare_all(self, 'learner')
        self.add_on_set_parameters_callback(reject_changes)
        device = pick_device(self.p['device'])
        self.learner = (self._parl_learner(device) if self.p['finetune.policy_checkpoint']
                        else self._bc_learner(device))
        self.inbox = collections.deque()
        self.inbox_lock = threading.Lock()
        self.dropped = 0
        self.pub_weights = self.create_publisher(UInt8MultiArray, 'weights', LATCHED_QOS)
        self.pub_status = self.create_publisher(String, 'learner/status', COMMAND_QOS)
        self.create_subscription(UInt8MultiArray, 'transitions', self.on_transitions,
                                 history_qos(self.p['transitions.history_depth']))
        self.create_timer(1.0 / self.p['update_rate_hz'], self.on_update_tick,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self.publish_status)
        self.get_logger().info(f'learner on {device}, version {self.learner.version}, '
                               f'{len(self.learner.replay)} episodes in replay')
        if self.learner.version > 0:
            self.publish_weights(self.learner.weights_message())

    def _parl_learner(self, device: str):
        import torch
        from omegaconf import OmegaConf

        from robot_rl.cli.config import compose
        from robot_rl.cli.finetune import FinetuneConfig  # noqa: F401  (registers the schema)
        from robot_rl.rl.finetune import Learner
        overrides = [o for o in self.p['finetune.overrides'] if o] + [
            f'learner.policy_path={self.p["finetune.policy_checkpoint"]}',
            f'learner.critic_path={self.p["finetune.critic_checkpoint"]}']
        cfg = OmegaConf.to_object(compose('finetune', overrides))
        self.get_logger().info(f'PA-RL on a Cal-QL critic, run directory '
                               f'{self.p["finetune.run_dir"]}')
        return Learner(cfg.learner, Path(self.p['finetune.run_dir']), torch.device(device),
                       self.p['seed'])

    def _bc_learner(self, device: str) -> OnlineLearner:
        name, kwargs = policy_spec(self.p)
        config = OnlineLearnerConfig(
            replay_dir=self.p['replay_dir'], checkpoint_dir=self.p['checkpoint_dir'],
            batch_size=self.p['batch_size'], lr=self.p['lr'],
            min_transitions=self.p['min_transitions'], publish_every=self.p['publish_every'],
            seed=self.p['seed'])
        return OnlineLearner(make_policy(name, {**kwargs, 'device': device}), name, config)

    def on_transitions(self, msg: UInt8MultiArray) -> None:
        with self.inbox_lock:
            self.inbox.append(conv.uint8_multiarray_bytes(msg))

    def on_update_tick(self) -> None:
        with self.inbox_lock:
            pending, self.inbox = list(self.inbox), collections.deque()
        for payload in pending:
            try:
                self.learner.ingest(decode_steps(payload))
            except (EnvelopeError, ValueError) as exc:
                self.dropped += 1
                self.get_logger().error(f'transition message dropped: {exc}')
        for _ in range(self.p['updates_per_tick']):
            if not self.learner.ready():
                return
            try:
                self.learner.update()
                blob = self.learner.maybe_publish()
            except LearnerStopped as exc:  # e.g. an unwritable checkpoint directory
                self.get_logger().fatal(str(exc))
                raise SystemExit(1) from exc
            if blob is not None:
                self.publish_weights(blob)

    def publish_weights(self, blob: bytes) -> None:
        self.pub_weights.publish(conv.bytes_to_uint8_multiarray(UInt8MultiArray, blob))
        self.get_logger().info(f'published weights version {self.learner.version}')

    def publish_status(self) -> None:
        lr = self.learner
        self.pub_status.publish(String(data=json.dumps({
            'steps_received': lr.steps_received, 'episodes': len(lr.replay),
            'transitions': lr.replay.num_transitions, 'version': lr.version,
            'updates': lr.updates, 'dropped': self.dropped,
            'duplicates': lr.assembler.duplicates,
            # PA-RL keeps a person's teleoperated steps as their own source (intervention_ratio)
            'intervention_transitions': (lr.interventions.num_transitions
                                         if hasattr(lr, 'interventions') else 0)})))


def main(args=None):
    run(LearnerNode, args)


if __name__ == '__main__':
    main()
