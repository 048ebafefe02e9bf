"""recorder: episodes as a Bridge-format RLDS dataset, topics as a rosbag2 MCAP bag.

Subscribes:
    transitions                 std_msgs/UInt8MultiArray step batches (reliable, transient
                                local): closed episodes -> <output_dir>/rlds/<dataset>/1.0.0
    camera/image_raw            sensor_msgs/Image (SENSOR_QOS)        } recorded raw (CDR)
    action                      std_msgs/Float32MultiArray            } into
    events, instruction         std_msgs/String                       } <output_dir>/bag (MCAP)
    episode/state, episode/result, label, estop, intervention, teleop/action    } also bagged
    episode/result              std_msgs/String JSON (episode manager): each episode's label
                                (success, label_source, late, ended_by) goes into its RLDS
                                episode metadata under "label"; intervention steps (a person's
                                actions) are listed under "intervention_steps"
No rosbag2 wheel exists on PyPI, so the bag is written with the `rosbags` writer (rosbag2
layout, metadata.yaml + MCAP storage, Jazzy message definitions); `ros2 bag info` reads it.
The RLDS dataset is rewritten (atomically, robot_rl.data.rlds.write_dataset) each flush period
in which an episode closed, so it always holds every closed episode of this run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import threading

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
        self.episodes, self.dirty = [], False
        self.results = {}  # episode id -> the episode manager's result (JSON object)
        self.lock = threading.Lock()
        self.bag = self.connections = None
        if self.p['bag']:
            self.open_bag()
        if self.p['rlds']:
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
        self.bag = Writer(self.out / 'bag', version=9, storage_plugin=StoragePlugin.MCAP)
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
            self.episodes.append(records_to_episode(
                instruction, steps, {'actor': actor, 'episode': episode,
                                     **step_metadata(steps)}))
            self.dirty = True

    def on_result(self, msg: String) -> None:
        try:
            episode = parse_result(msg.data).episode
        except ValueError as exc:
            self.get_logger().error(f'episode result dropped: {exc}')
            return
        self.results[episode] = json.loads(msg.data)
        self.dirty = True

    def flush_rlds(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        from robot_rl.data.rlds import write_dataset
        episodes = list(self.episodes)
        for e in episodes:  # a label may come after the episode's last transitions
            if e.metadata['episode'] in self.results:
                e.metadata.update(result_metadata(self.results[e.metadata['episode']]))
        path = write_dataset({'train': episodes}, self.out / 'rlds',
                             name=self.p['dataset_name'], image_format=self.p['image_format'],
                             overwrite=True)
        self.get_logger().info(f'RLDS: {len(episodes)} episodes in {path}')

    def destroy_node(self):
        with self.lock:
            if self.bag is not None:
                self.bag.close()
                self.bag = None
        return super().destroy_node()


def main(args=None):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    run(RecorderNode, args)


if __name__ == '__main__':
    main()
