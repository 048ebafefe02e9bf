"""recorder: episodes as a Bridge-format RLDS dataset, topics as a rosbag2 MCAP bag.

Subscribes:
    transitions                 std_msgs/UInt8MultiArray step batches (reliable, transient
                                local): closed episodes -> <output_dir>/rlds/<dataset>/1.0.0
    camera/image_raw            sensor_msgs/Image (SENSOR_QOS)        } recorded raw (CDR)
    action                      std_msgs/Float32MultiArray            } into
    events, instruction         std_msgs/String                       } <output_dir>/bag (MCAP)
    episode/state, episode/result, label, estop, intervention, teleop/action    } also bagged
    episode/result              std_msgs/String JSON (episode manager): each episode's label
                                (success, label_source, late, ended_by, reward, and the
                                success classifier's classifier_probability when it looked)
                                goes into its RLDS episode metadata under "label";
                                intervention steps (a person's actions) are listed under
                                "intervention_steps"
No rosbag2 wheel exists on PyPI, so the bag is written with the `rosbags` writer (rosbag2
layout, metadata.yaml + MCAP storage, Jazzy message definitions); `ros2 bag info` reads it.
Closed episodes are appended to the RLDS dataset (robot_rl.data.rlds.append_episodes: one new
shard per flush, nothing rewritten) once label_grace_s has passed since they closed, so a label
that arrives just after an episode's last transitions is still in its metadata. A restarted
recorder continues the same dataset and opens a new bag directory (bag, bag_1, ...); episodes
still waiting are written when the node shuts down. A failed write (disk full, a camera whose
size changed) is logged and retried each period; the episodes stay in memory meanwhile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import threading
import time

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float32MultiArray, String, UInt8MultiArray

from robot_rl.episodes.interventions import step_metadata
from robot_rl.episodes.overlay import parse_result, result_metadata
from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, history_qos, LATCHED_QOS,
                                       reject_changes, run, SENSOR_QOS)
from robot_rl.rl.online_learner import records_to_episode
from robot_rl.transport import decode_steps, EnvelopeError, EpisodeAssembler

BAG_TOPICS = (('camera/image_raw', Image, 'sensor_msgs/msg/Image', SENSOR_QOS),
              ('action', Float32MultiArray, 'std_msgs/msg/Float32MultiArray', COMMAND_QOS),
              ('events', String, 'std_msgs/msg/String', COMMAND_QOS),
              ('instruction', String, 'std_msgs/msg/String', LATCHED_QOS),
              ('episode/state', String, 'std_msgs/msg/String', LATCHED_QOS),
              ('episode/result', String, 'std_msgs/msg/String', history_qos(100)),
              ('label', String, 'std_msgs/msg/String', COMMAND_QOS),
              ('estop', Bool, 'std_msgs/msg/Bool', LATCHED_QOS),
              ('intervention', Bool, 'std_msgs/msg/Bool', LATCHED_QOS),
              ('teleop/action', Float32MultiArray, 'std_msgs/msg/Float32MultiArray',
               COMMAND_QOS))


class RecorderNode(Node):
    def __init__(self):
        super().__init__('recorder')
        self.p = declare_all(self, 'recorder')
        self.add_on_set_parameters_callback(reject_changes)
        self.out = Path(self.p['output_dir'])
        self.out.mkdir(parents=True, exist_ok=True)
        self.assembler = EpisodeAssembler()
        self.pending = []  # (monotonic time closed, Episode) not yet written
        self.pending_lock = threading.Lock()  # the flush timer runs beside the subscriptions
        self.flush_lock = threading.Lock()
        self.written = set()  # (actor, episode) already in the dataset
        self.results = {}  # episode id -> the episode manager's result (JSON object)
        self.lock = threading.Lock()
        self.bag = self.connections = None
        if self.p['bag']:
            self.open_bag()
        if self.p['rlds']:
            from robot_rl.data.bridge_spec import import_tf
            import_tf()  # now, not in the shutdown flush: a stopping node should stop fast
            self.create_subscription(UInt8MultiArray, 'transitions', self.on_transitions,
                                     history_qos(1000))
            self.create_subscription(String, 'episode/result', self.on_result,
                                     history_qos(100))
            self.create_timer(self.p['flush_period_s'], self.flush_rlds,
                              callback_group=MutuallyExclusiveCallbackGroup())

    def open_bag(self) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import get_typestore, Stores
        store = get_typestore(Stores.ROS2_JAZZY)
        self.bag = Writer(free_path(self.out / 'bag'), version=9,
                          storage_plugin=StoragePlugin.MCAP)
        self.bag.open()
        self.connections = {}
        for topic, msg_type, type_name, qos in BAG_TOPICS:
            full = self.resolve_topic_name(topic)
            self.connections[topic] = self.bag.add_connection(full, type_name, typestore=store)
            self.create_subscription(msg_type, topic, self._bag_callback(topic), qos, raw=True)

    def _bag_callback(self, topic: str):
        def write(raw: bytes) -> None:
            with self.lock:
                if self.bag is not None:
                    self.bag.write(self.connections[topic],
                                   self.get_clock().now().nanoseconds, raw)
        return write

    def on_transitions(self, msg: UInt8MultiArray) -> None:
        try:
            batch = decode_steps(conv.uint8_multiarray_bytes(msg))
        except EnvelopeError as exc:
            self.get_logger().error(f'transition message dropped: {exc}')
            return
        for (actor, episode), instruction, steps in self.assembler.add(batch):
            episode = records_to_episode(instruction, steps, {
                'actor': actor, 'episode': episode, **step_metadata(steps)})
            with self.pending_lock:
                self.pending.append((time.monotonic(), episode))

    def on_result(self, msg: String) -> None:
        try:
            episode = parse_result(msg.data).episode
        except ValueError as exc:
            self.get_logger().error(f'episode result dropped: {exc}')
            return
        self.results[episode] = json.loads(msg.data)
        if any(e == episode for _, e in self.written):
            self.get_logger().warn(f'the label of episode {episode} came after the episode was '
                                   'written to RLDS: it is in the bag only')

    def flush_rlds(self, everything: bool = False) -> None:
        """Append the episodes closed at least label_grace_s ago (all of them: `everything`)."""
        # The shutdown flush can start while the timer's is still writing: one at a time, or
        # both would append the same episodes.
        with self.flush_lock:
            self._flush_rlds(everything)

    def _flush_rlds(self, everything: bool) -> None:
        from robot_rl.data.rlds import append_episodes
        cutoff = time.monotonic() - self.p['label_grace_s']
        with self.pending_lock:
            ready = [e for closed, e in self.pending if everything or closed <= cutoff]
        if not ready:
            return
        for e in ready:  # a label may come after the episode's last transitions
            if e.metadata['episode'] in self.results:
                e.metadata.update(result_metadata(self.results[e.metadata['episode']]))
        try:
            path = append_episodes(ready, self.out / 'rlds', name=self.p['dataset_name'],
                                   image_format=self.p['image_format'])
        except (OSError, ValueError) as exc:
            self.get_logger().error(f'RLDS write of {len(ready)} episodes failed, kept in '
                                    f'memory and retried: {exc}', throttle_duration_sec=30.0)
            return
        done = {id(e) for e in ready}
        with self.pending_lock:
            self.pending = [(t, e) for t, e in self.pending if id(e) not in done]
        self.written.update((e.metadata['actor'], e.metadata['episode']) for e in ready)
        self.get_logger().info(f'RLDS: {len(ready)} episodes appended to {path}')

    def destroy_node(self):
        if self.p['rlds']:
            self.flush_rlds(everything=True)
        with self.lock:
            if self.bag is not None:
                self.bag.close()
                self.bag = None
        return super().destroy_node()


def free_path(path: Path) -> Path:
    """`path`, or the first of path_1, path_2, ... that does not exist (a restarted node)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f'{path.name}_{n}')
    return candidate


def main(args=None):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    run(RecorderNode, args)


if __name__ == '__main__':
    main()
