"""spacemouse: a 3Dconnexion SpaceMouse read from hidraw -> teleop/action at the control rate.

A person takes over with the episode manager's `t` (or `episode/command` "takeover"); while the
manager's `intervention` is true the policy node runs these actions (robot_rl.episodes.arbiter).
The node publishes whether or not anyone has taken over: the arbiter decides what runs.

Reads:
    device_path      raw HID reports (robot_rl.episodes.spacemouse), drained at read_rate_hz;
                     a malformed report is logged and dropped
Subscribes:
    intervention     std_msgs/Bool (LATCHED_QOS): a person has taken over
    action_sent      std_msgs/Float32MultiArray: the arm's executed action; until a person
                     takes over its gripper is adopted, so a takeover keeps the gripper as it is
Publishes:
    teleop/action    std_msgs/Float32MultiArray, one bounded 7-d delta per robot step
                     (COMMAND_QOS) at control_rate_hz, while the device is there. The policy
                     node runs the latest at its own rate, so this rate is twice its rate by
                     default: at equal rates the timers' phases drift and some steps find
                     nothing new (the arm stands still for that step)

When the device disappears (unplugged: a read error; end of file) the node logs an error and
stops publishing, and stays up. The policy node then hears nothing for teleop_timeout_s: while a
person has taken over the arm holds (zero motion, gripper unchanged), and control goes back to
the policy only when the person hands it back.
"""

from __future__ import annotations

from rclpy.node import Node
from std_msgs.msg import Bool, Float32MultiArray

from robot_rl.episodes.spacemouse import HidrawReader, SpaceMouseReportError, SpaceMouseTeleop
from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import COMMAND_QOS, declare_all, LATCHED_QOS, reject_changes, run


class SpaceMouseNode(Node):
    def __init__(self):
        super().__init__('spacemouse')
        self.p = declare_all(self, 'spacemouse')
        self.add_on_set_parameters_callback(reject_changes)
        self.teleop = SpaceMouseTeleop(
            full_scale=self.p['full_scale'], deadzone=self.p['deadzone'],
            translation_scale=self.p['translation_scale'],
            rotation_scale=self.p['rotation_scale'], axis_map=list(self.p['axis_map']),
            gripper_button=self.p['gripper_button'])
        self.reader = None
        self.pub_teleop = self.create_publisher(Float32MultiArray, 'teleop/action', COMMAND_QOS)
        self.create_subscription(Bool, 'intervention',
                                 lambda m: self.teleop.set_intervention(m.data), LATCHED_QOS)
        self.create_subscription(Float32MultiArray, 'action_sent', self.on_action_sent,
                                 COMMAND_QOS)
        try:
            self.reader = HidrawReader.open(self.p['device_path'])
        except OSError as exc:
            self.get_logger().error(f'{exc}; no teleop actions will be published')
            return
        self.get_logger().info(f'SpaceMouse on {self.p["device_path"]}: teleop/action at '
                               f'{self.p["control_rate_hz"]:g} Hz')
        self.read_timer = self.create_timer(1.0 / self.p['read_rate_hz'], self.on_read)
        self.control_timer = self.create_timer(1.0 / self.p['control_rate_hz'], self.on_control)

    def on_action_sent(self, msg: Float32MultiArray) -> None:
        try:
            self.teleop.executed(conv.action_from_floats(msg.data, self.teleop.bounds))
        except ValueError as exc:
            self.get_logger().error(f'action_sent dropped: {exc}')

    def on_read(self) -> None:
        for data in self.reader.read_reports():
            try:
                self.teleop.feed(data)
            except SpaceMouseReportError as exc:
                self.get_logger().error(f'report dropped: {exc}', throttle_duration_sec=5.0)
        if self.reader.gone is not None:
            self.stop(self.reader.gone)

    def on_control(self) -> None:
        self.pub_teleop.publish(conv.floats_to_multiarray(Float32MultiArray,
                                                          self.teleop.action()))

    def stop(self, reason: str) -> None:
        """The device is gone: no more reads, no more actions (the policy node then holds)."""
        self.destroy_timer(self.control_timer)
        self.destroy_timer(self.read_timer)
        self.get_logger().error(f'{reason}: teleop/action stopped (while a person has taken '
                                'over the arm holds); restart this node once it is back')

    def destroy_node(self):
        if self.reader is not None:
            self.reader.close()
        return super().destroy_node()


def main(args=None):
    run(SpaceMouseNode, args, threads=1)


if __name__ == '__main__':
    main()
