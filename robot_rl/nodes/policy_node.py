"""policy: camera + instruction in, 7-d actions out at the control rate; transitions out;
new weights in by version (keep-latest; the node never waits for the learner).

Subscribes:
    camera/image_raw   sensor_msgs/Image (SENSOR_QOS); the callback only keeps the latest
    instruction        std_msgs/String (LATCHED_QOS); an empty one is logged and ignored
    events             std_msgs/String JSON step events (COMMAND_QOS): state, reward, done
    weights            std_msgs/UInt8MultiArray weight envelope (LATCHED_QOS); the callback
                       keeps the latest, a timer verifies and loads it (older versions dropped)
    estop              std_msgs/Bool (LATCHED_QOS): nothing is sent while true, and the queued
                       chunk (temporal ensembling) is dropped
    intervention       std_msgs/Bool (LATCHED_QOS): a person has taken over
    teleop/action      std_msgs/Float32MultiArray, the person's device (one delta per step)
    episode/state      std_msgs/String JSON (LATCHED_QOS) from the episode manager: once one
                       arrives, episodes are the manager's (robot_rl.episodes.overlay): actions
                       only while one runs, steps renumbered, rewards from its labels
    episode/result     std_msgs/String JSON: an episode's label closes its transitions
Publishes:
    action             std_msgs/Float32MultiArray, 7-d, checked and clipped (COMMAND_QOS)
    transitions        std_msgs/UInt8MultiArray step-batch envelopes (reliable, transient
                       local, depth transitions.history_depth)
    policy/version     std_msgs/Int64, the weight version in use (LATCHED_QOS)
Inference runs in a timer in its own MutuallyExclusiveCallbackGroup (MultiThreadedExecutor),
only on a frame newer than the last one acted on.
Steering (robot_rl.steering.ValueGuidedSteering): steering.num_samples = K chunks per step,
scored by the critic in steering.critic_checkpoint (V-GPS; with steering.ensemble_checkpoints,
by the mean of several critics); without a critic one of the K is taken at random, which is the
policy's own distribution. Chosen chunks go through the temporal ensembler and sticky gripper;
candidates that are malformed are dropped, and with none left the node sends a hold action
(zero motion, gripper unchanged) instead of failing the control loop.
Who acts (robot_rl.episodes.arbiter): e-stop > teleoperation > hold (device lost while taken
over) > policy. A person's action is sent and stored as executed, flagged as an intervention.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Optional

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float32MultiArray, Int64, String, UInt8MultiArray

from policies.common import CHECKPOINT_FORMAT as POLICY_FORMAT, load_policy
from policies.scripted import make_policy
from robot_rl.episodes.arbiter import ActionArbiter, ESTOP
from robot_rl.episodes.overlay import EpisodeOverlay, parse_result, parse_state
from robot_rl.models.checkpoint import read_checkpoint
from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, history_qos, LATCHED_QOS,
                                       policy_spec, reject_changes, run, SENSOR_QOS)
from robot_rl.rl.finetune import check_fits, split_weights
from robot_rl.rl.learner import resolve_device
from robot_rl.steering import load_steering_critics, ValueGuidedSteering
from robot_rl.transport import (ActorTracker, decode_weights, encode_steps, EnvelopeError,
                                parse_event, VersionGate)
from robot_rl.types import ActionSpace, IMAGE_KEY, STATE_DIM, STATE_KEY


class PolicyNode(Node):
    def __init__(self):
        super().__init__('policy')
        self.p = declare_all(self, 'policy')
        self.add_on_set_parameters_callback(reject_changes)
        self.policy_name, self.policy_kwargs = policy_spec(self.p)
        self.space = ActionSpace.bridge()
        self.lock = threading.Lock()
        self.gate = VersionGate(0)
        self.version = 0
        self.policy = self._load_policy()
        self.steering = self._make_steering()
        self.actor_id = self.p['actor_id'] or f'{self.get_name()}-{os.getpid()}'
        self.instruction = self.p['default_instruction'].strip()
        self.latest_image: Optional[Image] = None
        self.images = collections.OrderedDict()  # recent frames by stamp (episode ends)
        self.closed_stamps = set()
        self.latest_weights: Optional[UInt8MultiArray] = None
        self.events = collections.OrderedDict()
        self.last_event = None
        self.last_stamp = -1
        self.tracker = ActorTracker()
        self.outbox, self.outbox_episode, self.seq = [], None, 0
        self.arbiter = ActionArbiter(self.p['teleop_timeout_s'], self.space)
        self.arbiter_lock = threading.Lock()
        self.overlay = EpisodeOverlay()
        self.manager_inbox = collections.deque()  # ('state' | 'result', JSON text)
        self.drop_queue = False
        self.pub_action = self.create_publisher(Float32MultiArray, 'action', COMMAND_QOS)
        self.pub_transitions = self.create_publisher(
            UInt8MultiArray, 'transitions', history_qos(self.p['transitions.history_depth']))
        self.pub_version = self.create_publisher(Int64, 'policy/version', LATCHED_QOS)
        self.create_subscription(Image, 'camera/image_raw', self.on_image, SENSOR_QOS)
        self.create_subscription(String, 'instruction', self.on_instruction, LATCHED_QOS)
        self.create_subscription(String, 'events', self.on_event, COMMAND_QOS)
        self.create_subscription(UInt8MultiArray, 'weights', self.on_weights, LATCHED_QOS)
        self.create_subscription(Bool, 'estop', self.on_estop, LATCHED_QOS)
        self.create_subscription(Bool, 'intervention', self.on_intervention, LATCHED_QOS)
        self.create_subscription(Float32MultiArray, 'teleop/action', self.on_teleop, COMMAND_QOS)
        self.create_subscription(String, 'episode/state',
                                 lambda m: self.manager_inbox.append(('state', m.data)),
                                 LATCHED_QOS)
        self.create_subscription(String, 'episode/result',
                                 lambda m: self.manager_inbox.append(('result', m.data)),
                                 history_qos(100))
        self.create_timer(1.0 / self.p['control_rate_hz'], self.on_control_tick,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(0.05, self.on_weights_tick,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.pub_version.publish(Int64(data=self.version))

    # ------------------------------------------------------------------ callbacks: store only

    def on_image(self, msg: Image) -> None:
        try:
            conv.check_image(msg)
        except ValueError as exc:
            self.get_logger().error(f'image dropped: {exc}')
            return
        self.images[conv.stamp_to_ns(msg.header.stamp)] = msg
        while len(self.images) > 16:
            self.images.popitem(last=False)
        self.latest_image = msg

    def on_instruction(self, msg: String) -> None:
        try:
            self.instruction = conv.check_instruction(msg.data)
        except ValueError as exc:
            self.get_logger().error(f'instruction dropped: {exc}')

    def on_event(self, msg: String) -> None:
        try:
            event = parse_event(msg.data)
        except ValueError as exc:
            self.get_logger().error(f'event dropped: {exc}')
            return
        self.events[event.stamp_ns] = event
        self.last_event = event
        while len(self.events) > 32:
            self.events.popitem(last=False)

    def on_weights(self, msg: UInt8MultiArray) -> None:
        self.latest_weights = msg

    def on_estop(self, msg: Bool) -> None:
        with self.arbiter_lock:
            self.arbiter.set_estop(msg.data)
            self.drop_queue = self.drop_queue or bool(msg.data)
        self.get_logger().warn(f'e-stop {"engaged: sending nothing" if msg.data else "released"}')

    def on_intervention(self, msg: Bool) -> None:
        with self.arbiter_lock:
            self.arbiter.set_intervention(msg.data)
        self.get_logger().info('intervention: ' + ('a person has taken over' if msg.data
                                                   else 'back to the policy'))

    def on_teleop(self, msg: Float32MultiArray) -> None:
        try:
            with self.arbiter_lock:
                self.arbiter.teleop(msg.data, time.monotonic())
        except ValueError as exc:
            self.get_logger().error(f'teleop action dropped: {exc}')

    # ------------------------------------------------------------------ timers: act

    def on_weights_tick(self) -> None:
        msg, self.latest_weights = self.latest_weights, None
        if msg is None:
            return
        try:
            update = decode_weights(conv.uint8_multiarray_bytes(msg))
            if update.meta.get('policy') != self.policy_name:
                raise EnvelopeError(f'weights are for policy {update.meta.get("policy")!r}, '
                                    f'this node runs {self.policy_name!r}')
            if update.version <= self.gate.current:
                self.get_logger().info(f'weights version {update.version} dropped (holding '
                                       f'{self.gate.current})')
                return
            with self.lock:
                self.load_weights(update)
            self.gate.accept(update.version)
            self.version = update.version
        except (EnvelopeError, ValueError, AttributeError) as exc:
            self.get_logger().error(f'weights message dropped: {exc}')
            return
        self.pub_version.publish(Int64(data=self.version))
        self.get_logger().info(f'now acting with weights version {self.version}')

    def load_weights(self, update) -> None:
        """A learner's weights: the policy's tensors, or (PA-RL) the policy's and the critic's,
        each checked against its module before either is copied (ValueError otherwise)."""
        if not any(key.startswith('policy.') for key in update.tensors):
            self.policy.load_weights(update.tensors, f'weights v{update.version}')
            return
        parts = split_weights(update)
        critics = self.steering.critics
        if parts['critic'] and len(critics) != 1:
            raise ValueError(f'the weights carry a critic but this node steers with '
                             f'{len(critics)} (set steering.critic_checkpoint alone)')
        critic = critics[0] if critics else None
        source = f'weights v{update.version}'
        check_fits(self.policy, parts['policy'], source)
        if parts['critic']:
            check_fits(critic, parts['critic'], source)
            critic.load_state_dict(parts['critic'])
        self.policy.load_state_dict(parts['policy'])

    def on_control_tick(self) -> None:
        self.take_manager_messages()
        if not self.overlay.managed:
            self.close_episodes()
        msg = self.latest_image
        if msg is None or not self.instruction:
            return
        if self.overlay.managed and not self.overlay.state.running:
            return  # no managed episode runs: keep the frame for when one starts
        self.latest_image = None if msg is self.latest_image else self.latest_image
        try:
            image = conv.image_to_rgb(msg)
        except ValueError as exc:
            self.get_logger().error(f'image dropped: {exc}')
            return
        stamp = conv.stamp_to_ns(msg.header.stamp)
        if stamp <= self.last_stamp:
            return  # no new frame since the last action
        self.last_stamp = stamp
        event = self.events.get(stamp)
        if event is not None and event.done and not self.overlay.managed:
            return  # the episode's final frame: nothing to act on
        if event is not None and not self.overlay.managed:
            self.queue_steps(self.tracker.observe(image, event), event.episode)
        state = event.state if event is not None else self.robot_state()
        decision = self.decide()
        if decision.source == ESTOP:
            return
        action = decision.action if decision.action is not None else self.act(image, state)
        if action is None:
            return
        with self.arbiter_lock:
            if self.arbiter.estop:
                return  # the e-stop came while the policy ran: it wins over this action
            self.arbiter.sent(action)
        if self.overlay.managed:  # a managed step exists only once its action is sent
            event = self.overlay.rewrite(stamp, state)
            if event is not None:
                self.queue_steps(self.tracker.observe(image, event), event.episode)
        self.pub_action.publish(conv.floats_to_multiarray(Float32MultiArray, action))
        if event is not None:
            self.tracker.acted(image, event, action, self.version, decision.intervention)

    def decide(self):
        """The arbiter's decision; after an e-stop the queued chunk is dropped first."""
        with self.arbiter_lock:
            decision = self.arbiter.decide(time.monotonic())
            drop, self.drop_queue = self.drop_queue, False
        if drop:
            with self.lock:
                self.steering.reset()
        return decision

    def robot_state(self) -> np.ndarray:
        return self.last_event.state if self.last_event else np.zeros(STATE_DIM, np.float32)

    def take_manager_messages(self) -> None:
        """Apply the episode manager's states and results in arrival order."""
        while self.manager_inbox:
            kind, text = self.manager_inbox.popleft()
            try:
                if kind == 'state':
                    stopped = self.overlay.on_state(parse_state(text))
                    if stopped is not None:
                        self.end_managed_episode(stopped)
                else:
                    result = parse_result(text)
                    self.queue_steps(self.overlay.close(result), result.episode)
            except ValueError as exc:
                self.get_logger().error(f'episode manager message dropped: {exc}')

    def end_managed_episode(self, episode: int) -> None:
        """The manager ended `episode`: its last frame closes it, held until its label."""
        with self.lock:
            self.steering.reset()
        if not self.images:
            return
        stamp, msg = next(reversed(self.images.items()))
        try:
            image = conv.image_to_rgb(msg)
        except ValueError as exc:
            self.get_logger().error(f'image dropped: {exc}')
            return
        final = self.overlay.final_event(episode, stamp, self.robot_state())
        self.queue_steps(self.overlay.hold(episode, self.tracker.observe(image, final)),
                         episode)

    def close_episodes(self) -> None:
        """Emit the final step of every episode whose last event and frame have arrived (the
        robot may reset before the next tick, so the final frame is taken from recent ones)."""
        for stamp, event in list(self.events.items()):
            if not event.done or stamp in self.closed_stamps or stamp not in self.images:
                continue
            self.closed_stamps.add(stamp)
            try:
                image = conv.image_to_rgb(self.images[stamp])
            except ValueError as exc:
                self.get_logger().error(f'image dropped: {exc}')
                continue
            self.queue_steps(self.tracker.observe(image, event), event.episode)
            with self.lock:
                self.steering.reset()
        if len(self.closed_stamps) > 64:
            self.closed_stamps = {s for s in self.closed_stamps if s in self.events}

    def act(self, image: np.ndarray, state: np.ndarray) -> Optional[np.ndarray]:
        obs = {IMAGE_KEY: image, STATE_KEY: np.asarray(state, np.float32)}
        try:
            with self.lock:
                self.steering.num_samples = self.p['steering.num_samples']
                return self.space.check(self.steering.act(obs, self.instruction))
        except ValueError as exc:
            self.get_logger().error(f'policy output dropped, no action sent: {exc}')
            return None

    def queue_steps(self, records, episode: int) -> None:
        if not self.p['transitions.enabled'] or not records:
            return
        if self.outbox and self.outbox_episode != episode:
            self.flush()
        self.outbox += records
        self.outbox_episode = episode
        if len(self.outbox) >= self.p['transitions.batch_steps'] or records[-1].is_last:
            self.flush()

    def flush(self) -> None:
        if not self.outbox:
            return
        payload = encode_steps(self.outbox, actor=self.actor_id, episode=self.outbox_episode,
                               instruction=self.instruction, seq=self.seq,
                               image_format=self.p['transitions.image_format'])
        self.pub_transitions.publish(conv.bytes_to_uint8_multiarray(UInt8MultiArray, payload))
        self.seq += 1
        self.outbox = []

    def _load_policy(self):
        """The configured policy: a trained checkpoint (robot-rl-train-bc) rebuilds its own
        class; other weights files load into policy.name's module."""
        path = self.p['policy.checkpoint']
        if not path:
            return make_policy(self.policy_name, self.policy_kwargs)
        tensors, meta = read_checkpoint(path)  # FileNotFoundError names a missing file
        if meta.get('format') == POLICY_FORMAT:
            policy = load_policy(path, device=resolve_device(self.p['device']))
            self.policy_name = policy.name
            return policy
        policy = make_policy(self.policy_name, self.policy_kwargs)
        policy.load_weights({k: v.numpy() for k, v in tensors.items()}, path)
        self.version = int(meta.get('version', 0))
        self.gate = VersionGate(self.version)
        return policy

    def _make_steering(self) -> ValueGuidedSteering:
        k = self.p['steering.num_samples']
        path = self.p['steering.critic_checkpoint']
        ensemble = [p for p in self.p['steering.ensemble_checkpoints'] if p]
        if ensemble and not path:
            raise ValueError('steering.ensemble_checkpoints is set without '
                             'steering.critic_checkpoint: set the first critic there')
        if not path:
            return ValueGuidedSteering(self.policy, None, None, num_samples=k,
                                       selection='random', bounds=self.space)
        from robot_rl.rl.learner import make_embed
        device = resolve_device(self.p['device'])
        paths = [path, *ensemble]
        critics, space = load_steering_critics(paths, device)
        embed = make_embed(critics[0].config.lang_dim, None, device)
        self.get_logger().info(f'V-GPS steering: K={k}, critics {paths}')
        return ValueGuidedSteering(self.policy, critics, space,
                                   num_samples=k, temperature=self.p['steering.temperature'],
                                   embed=embed, bounds=self.space, device=str(device),
                                   scoring=self.p['steering.scoring'])


def main(args=None):
    run(PolicyNode, args)


if __name__ == '__main__':
    main()
