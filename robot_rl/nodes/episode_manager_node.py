"""episode_manager: starts and ends episodes, takes labels, resets, e-stop, keyboard takeover.

Run it in its own terminal (an SSH session, a tmux pane) to get the keyboard and the live status
line; without a terminal (launch files, tests) the episode/command topic does the same.

Subscribes:
    episode/command  std_msgs/String: a command name (start, success, failure, end, pause,
                     estop, release, takeover; robot_rl.episodes.keyboard)
    label            std_msgs/String JSON {"success": bool, "episode": int (optional: the
                     running episode, else the latest one awaiting a label), "source": str}
    action_sent      std_msgs/Float32MultiArray: each executed action counts one step
    policy/version   std_msgs/Int64 (LATCHED_QOS): shown in the status line
    instruction      std_msgs/String (LATCHED_QOS), when the instruction parameter is empty
    camera/image_raw sensor_msgs/Image (SENSOR_QOS), only with a success classifier
                     (classifier_path): the callback keeps the latest frame; the classifier
                     runs on the timer (robot_rl.episodes.labeller)
Publishes:
    episode/state    std_msgs/String JSON {phase, episode, step, instruction, awaiting_label,
                     message, and "classifier" while it asks a person} (LATCHED_QOS), on
                     every change
    episode/result   std_msgs/String JSON of each closed episode (robot_rl.episodes.manager.
                     EpisodeResult: success, reward, terminal, label_source, late, ended_by,
                     classifier_probability; reliable, transient local, depth 100)
    label/feedback   std_msgs/String JSON {accepted, reason, episode} for every label
    estop            std_msgs/Bool (LATCHED_QOS): the robot/sim drop actions while true
    intervention     std_msgs/Bool (LATCHED_QOS): a person has taken over (the policy node
                     then sends teleop/action, or holds when the device goes quiet)
    teleop/action    std_msgs/Float32MultiArray: keyboard end-effector deltas while taken over
    instruction      std_msgs/String (LATCHED_QOS), when the instruction parameter is set
Services:
    label            std_srvs/SetBool: data = success, for the running episode or else the
                     latest awaiting a label; response.message gives the reason of a rejection
Calls:
    reset_service    std_srvs/Trigger before every episode (timeout reset_timeout_s)
"""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float32MultiArray, Int64, String
from std_srvs.srv import SetBool, Trigger

from robot_rl.episodes import keyboard as kb
from robot_rl.episodes.labeller import ClassifierLabeller, load_probability
from robot_rl.episodes.manager import (CommandRejected, EpisodeManager, LabelRejected,
                                       ManagerConfig, parse_label, RESETTING)
from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import (COMMAND_QOS, declare_all, history_qos, LATCHED_QOS,
                                       reject_changes, run, SENSOR_QOS)


class EpisodeManagerNode(Node):
    def __init__(self):
        super().__init__('episode_manager')
        self.p = declare_all(self, 'episode_manager')
        self.add_on_set_parameters_callback(reject_changes)
        self.manager = EpisodeManager(ManagerConfig(
            max_steps=self.p['max_episode_steps'],
            late_label_window_s=self.p['late_label_window_s'],
            reset_timeout_s=self.p['reset_timeout_s']))
        self.instruction = self.p['instruction'].strip()
        self.teleop = kb.KeyboardTeleop(self.p['teleop.step_m'], self.p['teleop.step_rad'])
        self.terminal = kb.RawTerminal() if self.p['keyboard'] else None
        self.commands = collections.deque()
        self.intervening = False
        self.version = 0
        self.last_action = None
        self.reset_future = None
        self.last_state = None
        self.last_line = ''
        self.latest_image = None
        self.labeller = self.make_labeller()
        self.pub_state = self.create_publisher(String, 'episode/state', LATCHED_QOS)
        self.pub_result = self.create_publisher(String, 'episode/result', history_qos(100))
        self.pub_feedback = self.create_publisher(String, 'label/feedback', COMMAND_QOS)
        self.pub_estop = self.create_publisher(Bool, 'estop', LATCHED_QOS)
        self.pub_intervention = self.create_publisher(Bool, 'intervention', LATCHED_QOS)
        self.pub_teleop = self.create_publisher(Float32MultiArray, 'teleop/action', COMMAND_QOS)
        self.pub_instruction = (self.create_publisher(String, 'instruction', LATCHED_QOS)
                                if self.instruction else None)
        self.create_subscription(String, 'episode/command', self.on_command, COMMAND_QOS)
        self.create_subscription(String, 'label', self.on_label, COMMAND_QOS)
        self.create_subscription(Float32MultiArray, 'action_sent', self.on_action_sent,
                                 COMMAND_QOS)
        self.create_subscription(Int64, 'policy/version', self.on_version, LATCHED_QOS)
        if not self.instruction:
            self.create_subscription(String, 'instruction', self.on_instruction, LATCHED_QOS)
        if self.labeller is not None:
            self.create_subscription(Image, 'camera/image_raw', self.on_image, SENSOR_QOS)
        self.create_service(SetBool, 'label', self.on_label_service)
        self.reset_client = (self.create_client(Trigger, self.p['reset_service'])
                             if self.p['reset_service'] else None)
        self.create_timer(1.0 / self.p['control_rate_hz'], self.on_tick)
        self.pub_estop.publish(Bool(data=False))
        self.pub_intervention.publish(Bool(data=False))
        if self.pub_instruction is not None:
            self.pub_instruction.publish(String(data=self.instruction))
        if self.terminal is not None and self.terminal.available:
            print(kb.HELP, flush=True)
        self.publish_state()

    def make_labeller(self):
        """The success classifier's labeller (classifier_path), or None: a person labels."""
        if not self.p['classifier_path']:
            return None
        probability = load_probability(self.p['classifier_path'],
                                       self.p['classifier_language_model'])
        labeller = ClassifierLabeller(
            lambda msg, instruction: probability(conv.image_to_rgb(msg), instruction),
            self.p['classifier_confidence'], self.p['classifier_check_every_steps'])
        self.get_logger().info(f'success classifier {self.p["classifier_path"]}: labels at '
                               f'confidence >= {labeller.confidence:g}, a person otherwise')
        return labeller

    # ------------------------------------------------------------------ inputs

    def on_image(self, msg: Image) -> None:
        self.latest_image = msg  # decoded only when the classifier looks at it

    def on_command(self, msg: String) -> None:
        self.dispatch(msg.data.strip(), 'topic')

    def on_label(self, msg: String) -> None:
        try:
            label = parse_label(msg.data)
            self.apply_label(label.success, label.source, label.episode)
        except LabelRejected as exc:
            self.reject_label(str(exc))

    def on_label_service(self, request, response):
        try:
            result = self.apply_label(bool(request.data), 'service', None)
            response.success, response.message = True, f'episode {result.episode} labelled'
        except LabelRejected as exc:
            self.reject_label(str(exc))
            response.success, response.message = False, str(exc)
        return response

    def on_action_sent(self, msg: Float32MultiArray) -> None:
        self.last_action = np.asarray(msg.data, np.float32)
        self.manager.step(time.monotonic())
        self.after_change()

    def on_version(self, msg: Int64) -> None:
        self.version = int(msg.data)

    def on_instruction(self, msg: String) -> None:
        if msg.data.strip():
            self.instruction = msg.data.strip()

    # ------------------------------------------------------------------ commands and labels

    def dispatch(self, command: str, source: str) -> None:
        """Run one command; a rejected one is logged with its reason and changes nothing."""
        now = time.monotonic()
        m = self.manager
        try:
            if command == kb.ESTOP:
                self.pub_estop.publish(Bool(data=True))  # first: nothing may move after this
                m.estop(now)
                self.get_logger().warn(f'e-stop engaged ({source})')
            elif command == kb.RELEASE:
                m.release()
                self.pub_estop.publish(Bool(data=False))
                self.get_logger().warn(f'e-stop released ({source})')
            elif command == kb.START:
                m.start(self.instruction, now)
                if self.pub_instruction is not None:
                    self.pub_instruction.publish(String(data=self.instruction))
            elif command in (kb.SUCCESS, kb.FAILURE):
                self.apply_label(command == kb.SUCCESS, source, None)
            elif command == kb.END:
                m.end(now)
            elif command == kb.PAUSE:
                m.resume() if m.phase == 'paused' else m.pause()
            elif command == kb.TAKEOVER:
                self.intervening = not self.intervening
                self.pub_intervention.publish(Bool(data=self.intervening))
                self.get_logger().info('a person has taken over' if self.intervening
                                       else 'control handed back to the policy')
            elif command == kb.QUIT:
                raise KeyboardInterrupt
            else:
                raise CommandRejected(f'unknown command {command!r} (known: '
                                      f'{sorted(kb.COMMANDS)})')
        except (CommandRejected, LabelRejected) as exc:
            m.message = str(exc)
            self.get_logger().warn(f'{command} rejected: {exc}')
        self.after_change()

    def apply_label(self, success: bool, source: str, episode):
        result = self.manager.label(success, source, time.monotonic(), episode)
        self.pub_feedback.publish(String(data=json.dumps(
            {'accepted': True, 'reason': '', 'episode': result.episode})))
        self.after_change()
        return result

    def reject_label(self, reason: str) -> None:
        self.get_logger().warn(f'label rejected: {reason}')
        self.pub_feedback.publish(String(data=json.dumps(
            {'accepted': False, 'reason': reason, 'episode': None})))

    # ------------------------------------------------------------------ the tick

    def on_tick(self) -> None:
        if self.terminal is not None:
            for key in self.terminal.keys():
                command = kb.command_for_key(key)
                if command is not None:
                    self.dispatch(command, 'keyboard')
                elif self.intervening:
                    self.teleop.press(key)
        if self.intervening and self.terminal is not None and self.terminal.available:
            self.pub_teleop.publish(conv.floats_to_multiarray(Float32MultiArray,
                                                              self.teleop.action()))
        self.run_labeller()
        self.manager.tick(time.monotonic())
        self.run_reset()
        self.after_change()
        self.print_status()

    def run_reset(self) -> None:
        """The reset routine: one Trigger call per episode start; its answer ends it."""
        m = self.manager
        if m.phase != RESETTING:
            self.reset_future = None
            return
        if self.reset_client is None:
            m.reset_done(True, time.monotonic())
            return
        if self.reset_future is None:
            if self.reset_client.service_is_ready():
                self.reset_future = self.reset_client.call_async(Trigger.Request())
            return  # not there yet: the manager's timeout decides
        if self.reset_future.done():
            response = self.reset_future.result()
            ok = response is not None and response.success
            m.reset_done(ok, time.monotonic(),
                         '' if ok else getattr(response, 'message', 'no response'))

    def run_labeller(self) -> None:
        """The classifier's looks kept by `note`, run here (a timer, not a callback)."""
        if self.labeller is None:
            return
        for j in self.labeller.run(self.manager, time.monotonic()):
            what = (f'classifier on episode {j.episode} '
                    f'({"final frame" if j.final else "check"}): {j.decision}'
                    + ('' if j.probability is None else f' (p={j.probability:.2f})'))
            if j.reason:
                self.get_logger().warn(f'{what}: {j.reason}')
            elif j.final or j.applied:
                self.get_logger().info(what)

    def after_change(self) -> None:
        if self.labeller is not None:
            self.labeller.note(self.manager, self.latest_image)
        for result in self.manager.pop_results():
            self.pub_result.publish(String(data=json.dumps(result.to_dict())))
            self.get_logger().info(f'episode {result.episode}: '
                                   f'{"success" if result.success else "failure"} '
                                   f'({result.label_source}{", late" if result.late else ""}'
                                   + ('' if result.classifier_probability is None else
                                      f', classifier p={result.classifier_probability:.2f}')
                                   + ')')
            if self.p['auto_start'] and self.manager.phase == 'idle':
                self.dispatch(kb.START, 'auto_start')
        self.publish_state()

    def status(self) -> dict:
        """The manager's status, and the classifier's request to a person while it asks."""
        status = self.manager.status()
        prompt = self.labeller.prompt(self.manager) if self.labeller is not None else ''
        if prompt:
            status['classifier'] = prompt
        return status

    def publish_state(self) -> None:
        status = self.status()
        if status != self.last_state:
            self.last_state = status
            self.pub_state.publish(String(data=json.dumps(status)))

    def print_status(self) -> None:
        line = kb.status_line(self.status(), self.last_action, self.version,
                              'person' if self.intervening else 'policy')
        if self.terminal is not None and self.terminal.available:
            sys.stdout.write('\r' + line[:200] + '\033[K')
            sys.stdout.flush()
        elif line != self.last_line:
            self.get_logger().info(line)
        self.last_line = line

    def destroy_node(self):
        if self.terminal is not None:
            self.terminal.close()
        return super().destroy_node()


def main(args=None):
    run(EpisodeManagerNode, args, threads=1)


if __name__ == '__main__':
    main()
