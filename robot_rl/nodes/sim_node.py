"""sim: the MuJoCo WidowX scene as a ROS 2 node, so every launch file runs without hardware.

Subscribes:
    action        std_msgs/Float32MultiArray (7-d delta EE action; COMMAND_QOS). Each valid action
                  advances the simulation one 0.2 s control step (action-driven: the policy's
                  rate is the control rate). Wrong length / non-finite: logged and dropped.
    estop         std_msgs/Bool (LATCHED_QOS): true = ignore actions until false.
Publishes:
    camera/image_raw             sensor_msgs/Image rgb8 (SENSOR_QOS)
    camera/image_raw/compressed  sensor_msgs/CompressedImage jpeg (SENSOR_QOS)
    joint_states                 sensor_msgs/JointState, arm joints (SENSOR_QOS)
    events                       std_msgs/String JSON step event (robot_rl.transport.events;
                                 COMMAND_QOS), same stamp as the frame
    instruction                  std_msgs/String, the task instruction (LATCHED_QOS)
    action_sent                  std_msgs/Float32MultiArray, the clipped action applied
Services:
    reset         std_srvs/Trigger: start a new episode.
Watchdog: with no action for two control periods the arm holds (the sim is not stepped) and
the latest observation is re-published, so a subscriber that missed it can act.
"""

from __future__ import annotations

import time

from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float32MultiArray, Header, String
from std_srvs.srv import Trigger

from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, LATCHED_QOS, reject_changes,
                                       run, SENSOR_QOS)
from robot_rl.transport.events import StepEvent
from robot_rl.types import ActionSpace, IMAGE_KEY, STATE_KEY


class SimNode(Node):
    def __init__(self):
        super().__init__('sim')
        self.p = declare_all(self, 'sim')
        self.add_on_set_parameters_callback(reject_changes)
        from robot_rl.envs import make_env  # MuJoCo + GL set-up only when the node starts
        from robot_rl.envs.widowx_env import ARM_JOINTS
        self.env = make_env(self.p['task'], image_size=self.p['image_size'])
        self.joint_names = list(ARM_JOINTS)
        self.space = ActionSpace.bridge()
        self.period = 1.0 / self.p['control_rate_hz']
        self.episode, self.step_count, self.estop = -1, 0, False
        self.last_action_time = time.monotonic()
        self.obs = self.stamp = self.event = None
        self.pub_image = self.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
        self.pub_compressed = self.create_publisher(CompressedImage,
                                                    'camera/image_raw/compressed', SENSOR_QOS)
        self.pub_joints = self.create_publisher(JointState, 'joint_states', SENSOR_QOS)
        self.pub_events = self.create_publisher(String, 'events', COMMAND_QOS)
        self.pub_instruction = self.create_publisher(String, 'instruction', LATCHED_QOS)
        self.pub_sent = self.create_publisher(Float32MultiArray, 'action_sent', COMMAND_QOS)
        self.create_subscription(Float32MultiArray, 'action', self.on_action, COMMAND_QOS)
        self.create_subscription(Bool, 'estop', self.on_estop, LATCHED_QOS)
        self.create_service(Trigger, 'reset', self.on_reset)
        self.create_timer(2 * self.period, self.on_watchdog)
        self.pub_instruction.publish(String(data=self.env.instruction))
        self.reset_episode()

    def reset_episode(self) -> None:
        self.episode += 1
        self.step_count = 0
        self.obs, _ = self.env.reset(seed=self.p['seed'] + self.episode)
        self.publish_observation(reward=None, terminated=False, truncated=False, success=False)

    def on_action(self, msg: Float32MultiArray) -> None:
        if self.estop:
            self.get_logger().warn('e-stop active: action dropped', throttle_duration_sec=2.0)
            return
        try:
            action = conv.action_from_floats(msg.data, self.space)
        except ValueError as exc:
            self.get_logger().error(f'action dropped: {exc}')
            return
        self.last_action_time = time.monotonic()
        self.obs, reward, terminated, truncated, info = self.env.step(action)
        self.pub_sent.publish(conv.floats_to_multiarray(Float32MultiArray, action))
        self.step_count += 1
        limit = self.p['max_episode_steps']
        truncated = bool(truncated or (limit and self.step_count >= limit and not terminated))
        self.publish_observation(float(reward), bool(terminated), truncated,
                                 bool(info['success']))
        if (terminated or truncated) and self.p['auto_reset']:
            self.reset_episode()

    def publish_observation(self, reward, terminated: bool, truncated: bool,
                            success: bool) -> None:
        now = self.get_clock().now()
        self.stamp = now.to_msg()
        self.event = StepEvent(episode=self.episode, step=self.step_count,
                               stamp_ns=now.nanoseconds, state=self.obs[STATE_KEY],
                               reward=reward, terminated=terminated, truncated=truncated,
                               success=success, instruction=self.env.instruction)
        self.republish()

    def republish(self) -> None:
        header = Header(stamp=self.stamp, frame_id=self.p['frame_id'])
        self.pub_events.publish(String(data=self.event.to_json()))
        self.pub_image.publish(conv.rgb_to_image(Image, header, self.obs[IMAGE_KEY]))
        self.pub_compressed.publish(conv.rgb_to_compressed(
            CompressedImage, header, self.obs[IMAGE_KEY], self.p['jpeg_quality']))
        self.pub_joints.publish(JointState(header=header, name=self.joint_names,
                                           position=self.env.joint_positions().tolist()))

    def on_watchdog(self) -> None:
        if time.monotonic() - self.last_action_time > 2 * self.period and self.obs is not None:
            self.republish()  # holding: nothing is stepped

    def on_estop(self, msg: Bool) -> None:
        self.estop = bool(msg.data)
        self.get_logger().warn(f'e-stop {"engaged" if self.estop else "released"}')

    def on_reset(self, request, response):
        self.reset_episode()
        response.success, response.message = True, f'episode {self.episode}'
        return response

    def destroy_node(self):
        self.env.close()
        return super().destroy_node()


def main(args=None):
    run(SimNode, args, threads=1)


if __name__ == '__main__':
    main()
