"""widowx: 7-d delta EE actions in, clamped joint commands out to the real WidowX 250.

Subscribes:
    action                   std_msgs/Float32MultiArray (COMMAND_QOS); the callback checks it
                             (wrong length / non-finite: logged, dropped) and keeps the latest
    /<robot>/joint_states    sensor_msgs/JointState (SENSOR_QOS): re-anchors the EE target
    estop                    std_msgs/Bool (LATCHED_QOS): true = hold until false
Publishes (timer at control_rate_hz):
    /<robot>/commands/joint_group   interbotix_xs_msgs/JointGroupCommand 'arm' (6 joints, rad)
    /<robot>/commands/joint_single  interbotix_xs_msgs/JointSingleCommand 'gripper'
      or trajectory_topic           trajectory_msgs/JointTrajectory (ros2_control), one point
                                    at one control period
    action_sent                     std_msgs/Float32MultiArray, the clipped action applied
    events                          std_msgs/String JSON step event (state; reward null)
Safety (robot_rl.nodes.arm_safety): workspace box, IK clipped to joint limits, per-step joint
change limit. Watchdog: no fresh action within two control periods -> hold (no new target).
"""

from __future__ import annotations

import time

from builtin_interfaces.msg import Duration
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float32MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from robot_rl.nodes import conversions as conv
from robot_rl.nodes.arm_safety import ARM_JOINTS, ArmCommander, Watchdog
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, LATCHED_QOS, reject_changes,
                                       run, SENSOR_QOS)
from robot_rl.transport.events import StepEvent
from robot_rl.types import ActionSpace


def interbotix_messages():
    """(JointGroupCommand, JointSingleCommand) or None when interbotix_xs_msgs is absent."""
    try:
        from interbotix_xs_msgs.msg import JointGroupCommand, JointSingleCommand
    except ImportError:
        return None
    return JointGroupCommand, JointSingleCommand


class WidowXNode(Node):
    def __init__(self):
        super().__init__('widowx')
        self.p = declare_all(self, 'widowx')
        self.add_on_set_parameters_callback(reject_changes)
        self.period = 1.0 / self.p['control_rate_hz']
        self.arm = ArmCommander(self.p['workspace_low'], self.p['workspace_high'],
                                self.p['max_joint_step'], self.p['ik_damping'])
        self.space = ActionSpace.bridge()
        self.watchdog = Watchdog(2 * self.period)
        self.pending = None
        self.estop, self.synced, self.step_count = False, False, 0
        robot = self.p['robot_model']
        self.interbotix = interbotix_messages() \
            if self.p['command_interface'] == 'interbotix' else None
        if self.p['command_interface'] == 'interbotix' and self.interbotix is None:
            self.get_logger().error('interbotix_xs_msgs is not importable: sending '
                                    'trajectory_msgs/JointTrajectory instead')
        if self.interbotix:
            group, single = self.interbotix
            self.pub_group = self.create_publisher(group, f'/{robot}/commands/joint_group', 10)
            self.pub_single = self.create_publisher(single, f'/{robot}/commands/joint_single',
                                                    10)
        else:
            self.pub_traj = self.create_publisher(JointTrajectory, self.p['trajectory_topic'],
                                                  10)
        self.pub_sent = self.create_publisher(Float32MultiArray, 'action_sent', COMMAND_QOS)
        self.pub_events = self.create_publisher(String, 'events', COMMAND_QOS)
        self.create_subscription(Float32MultiArray, 'action', self.on_action, COMMAND_QOS)
        self.create_subscription(JointState, f'/{robot}/joint_states', self.on_joints,
                                 SENSOR_QOS)
        self.create_subscription(Bool, 'estop', self.on_estop, LATCHED_QOS)
        self.create_timer(self.period, self.on_tick)

    def on_action(self, msg: Float32MultiArray) -> None:
        try:
            self.pending = conv.action_from_floats(msg.data, self.space)
        except ValueError as exc:
            self.get_logger().error(f'action dropped: {exc}')
            return
        self.watchdog.feed(time.monotonic())

    def on_joints(self, msg: JointState) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        if self.synced or not all(j in index for j in ARM_JOINTS):
            return
        self.arm.sync(np.array([msg.position[index[j]] for j in ARM_JOINTS]))
        self.synced = True

    def on_estop(self, msg: Bool) -> None:
        self.estop = bool(msg.data)
        self.get_logger().warn(f'e-stop {"engaged: holding" if self.estop else "released"}')

    def on_tick(self) -> None:
        action, self.pending = self.pending, None
        if self.estop or action is None or self.watchdog.expired(time.monotonic()):
            return  # hold: position mode keeps the last target; nothing new is sent
        joints, gripper, applied = self.arm.step(action)
        self.send(joints, gripper)
        self.pub_sent.publish(conv.floats_to_multiarray(Float32MultiArray, applied))
        self.step_count += 1
        state = np.concatenate([self.arm.state(), [gripper]]).astype(np.float32)
        self.pub_events.publish(String(data=StepEvent(
            episode=0, step=self.step_count, stamp_ns=self.get_clock().now().nanoseconds,
            state=state, reward=None, terminated=False, truncated=False, success=False,
            instruction='').to_json()))

    def send(self, joints: np.ndarray, gripper: float) -> None:
        if self.interbotix:
            group, single = self.interbotix
            self.pub_group.publish(group(name='arm', cmd=[float(q) for q in joints]))
            self.pub_single.publish(single(name='gripper', cmd=float(gripper)))
            return
        nanos = int(self.period * 1e9)
        point = JointTrajectoryPoint(positions=[float(q) for q in joints],
                                     time_from_start=Duration(sec=nanos // 10 ** 9,
                                                              nanosec=nanos % 10 ** 9))
        self.pub_traj.publish(JointTrajectory(joint_names=list(ARM_JOINTS), points=[point]))


def main(args=None):
    run(WidowXNode, args, threads=1)


if __name__ == '__main__':
    main()
