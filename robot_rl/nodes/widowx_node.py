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
Services:
    home                            std_srvs/Trigger: move the arm to its home joint pose
                                    (arm_safety.HOME_JOINTS, gripper open), the episode
                                    manager's reset routine (reset_service:=home). It answers
                                    success once the measured joints are within
                                    home_tolerance_rad of home; failure with the reason under
                                    the e-stop, without joint states, or after home_timeout_s.
                                    Actions are ignored while it runs.
Safety (robot_rl.nodes.arm_safety): workspace box, IK clipped to joint limits, per-step joint
change limit (homing too). Watchdog: no fresh action within two control periods -> hold (no new
target).
"""

from __future__ import annotations

import time

from builtin_interfaces.msg import Duration
import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float32MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from robot_rl.nodes import conversions as conv
from robot_rl.nodes.arm_safety import ARM_JOINTS, ArmCommander, HOME_JOINTS, Watchdog
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
        self.measured = None  # the latest measured arm joints (6,)
        self.homing = None  # (answer future, deadline) while the home service runs
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
        # Its own group: the awaiting callback holds its group until it answers, and the timer
        # (default group) must keep running to move the arm meanwhile.
        self.create_service(Trigger, 'home', self.on_home,
                            callback_group=MutuallyExclusiveCallbackGroup())
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
        if not all(j in index for j in ARM_JOINTS):
            return
        self.measured = np.array([msg.position[index[j]] for j in ARM_JOINTS], float)
        if not self.synced:
            self.arm.sync(self.measured)
            self.synced = True

    def on_estop(self, msg: Bool) -> None:
        self.estop = bool(msg.data)
        self.get_logger().warn(f'e-stop {"engaged: holding" if self.estop else "released"}')

    async def on_home(self, request, response):
        """The home service; the timer moves the arm and decides the answer (the callback
        awaits it, so nothing blocks the executor)."""
        if self.estop:
            response.success, response.message = False, ('e-stop engaged: release it before '
                                                         'homing')
            return response
        if self.homing is not None:
            response.success, response.message = False, 'already homing'
            return response
        if self.measured is not None:
            self.arm.sync(self.measured)  # start from where the arm is
        answer = Future()
        self.homing = (answer, time.monotonic() + self.p['home_timeout_s'])
        self.get_logger().info('homing')
        response.success, response.message = await answer
        return response

    def home_tick(self) -> None:
        """One control period of homing: answer, or one clamped step towards home."""
        answer, deadline = self.homing
        error = (None if self.measured is None
                 else float(np.max(np.abs(self.measured - HOME_JOINTS))))
        if self.estop:
            result = False, 'e-stop engaged during homing: the arm holds where it is'
        elif error is not None and error <= self.p['home_tolerance_rad']:
            result = True, f'home reached (largest joint error {error:.3f} rad)'
        elif time.monotonic() >= deadline:
            result = False, (f'home not reached within {self.p["home_timeout_s"]:g} s: ' + (
                f'no joint states on /{self.p["robot_model"]}/joint_states' if error is None
                else f'largest joint error {error:.3f} rad > home_tolerance_rad '
                     f'{self.p["home_tolerance_rad"]:g}'))
        else:
            self.send(self.arm.step_towards(HOME_JOINTS), 1.0)  # gripper open
            return
        if result[0]:
            self.arm.sync(self.measured)  # delta actions continue from the measured home
        self.homing = None
        self.pending = None  # nothing queued before homing runs after it
        if result[0]:  # one severity per call site (rclpy's logger requires it)
            self.get_logger().info(result[1])
        else:
            self.get_logger().error(result[1])
        answer.set_result(result)

    def on_tick(self) -> None:
        if self.homing is not None:
            self.pending = None  # homing owns the arm: actions are ignored meanwhile
            self.home_tick()
            return
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
