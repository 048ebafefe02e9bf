"""T1: the episode manager with the sim, policy and recorder nodes as processes (real rclpy).

One graph for the module; the tests run in order against it: a whole episode closed by a label,
a step-limit end with a late label (and rejected labels), a pause, a takeover whose teleop device
then goes quiet, an e-stop, and finally the recorder's RLDS episodes. Bounded: every wait has a
timeout, episodes are at most 25 managed steps (5 s).
"""

import json
import time

import numpy as np
import pytest
from ros_harness import Driver, ros_available

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

MAX_STEPS = 25
TELEOP = [0.02, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


class Session(Driver):
    """sim + policy + episode_manager + recorder, and an rclpy driver node."""

    def __init__(self, tmp):
        super().__init__(tmp, 't1_operator')
        from std_msgs.msg import Float32MultiArray, String, UInt8MultiArray
        from std_srvs.srv import SetBool

        from robot_rl.nodes.ros_common import COMMAND_QOS, history_qos, LATCHED_QOS
        self.states, self.results, self.feedback, self.actions, self.batches = [], [], [], [], []
        n = self.node
        n.create_subscription(String, 'episode/state',
                              lambda m: self.states.append(json.loads(m.data)), LATCHED_QOS)
        n.create_subscription(String, 'episode/result',
                              lambda m: self.results.append(json.loads(m.data)),
                              history_qos(100))
        n.create_subscription(String, 'label/feedback',
                              lambda m: self.feedback.append(json.loads(m.data)), COMMAND_QOS)
        n.create_subscription(Float32MultiArray, 'action', lambda m: self.actions.append(
            (time.monotonic(), np.array(m.data, np.float32))), COMMAND_QOS)
        n.create_subscription(UInt8MultiArray, 'transitions', self._on_batch, history_qos(1000))
        self.pub_command = n.create_publisher(String, 'episode/command', COMMAND_QOS)
        self.pub_label = n.create_publisher(String, 'label', COMMAND_QOS)
        self.pub_teleop = n.create_publisher(Float32MultiArray, 'teleop/action', COMMAND_QOS)
        self.label_client = n.create_client(SetBool, 'label')

    def _on_batch(self, msg):
        from robot_rl.nodes.conversions import uint8_multiarray_bytes
        from robot_rl.transport import decode_steps
        self.batches.append(decode_steps(uint8_multiarray_bytes(msg)))

    def command(self, name):
        from std_msgs.msg import String
        self.pub_command.publish(String(data=name))

    def label(self, **fields):
        from std_msgs.msg import String
        self.pub_label.publish(String(data=json.dumps(fields)))

    def call_label(self, success):
        from std_srvs.srv import SetBool
        future = self.label_client.call_async(SetBool.Request(data=success))
        self.wait(future.done, 10, 'the label service to answer')
        return future.result()

    def state(self):
        return self.states[-1] if self.states else {}

    def wait_phase(self, phase, episode, timeout=30):
        self.wait(lambda: self.state().get('phase') == phase
                  and self.state().get('episode') == episode, timeout,
                  f'phase {phase} of episode {episode}')

    def result(self, episode):
        return next((r for r in self.results if r['episode'] == episode), None)

    def episode_steps(self, episode):
        """Every step record of a managed episode, in order (once its last step arrived)."""
        steps = {s.step: s for b in self.batches if b.episode == episode for s in b.steps}
        return [steps[i] for i in sorted(steps)]

    def closed(self, episode):
        steps = self.episode_steps(episode)
        return bool(steps) and steps[-1].is_last and len(steps) == steps[-1].step + 1


@pytest.fixture(scope='module')
def session(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp('t1_episodes'))
    s.start('sim', 'sim', {'task': 'stack_blocks', 'image_size': 64, 'auto_reset': False})
    s.start('policy', 'policy', {'transitions.batch_steps': 3, 'teleop_timeout_s': 0.6})
    s.start('episode_manager', 'episode_manager', {
        'keyboard': False, 'max_episode_steps': MAX_STEPS, 'late_label_window_s': 60.0,
        'reset_timeout_s': 20.0})
    s.start('recorder', 'recorder', {'output_dir': 'rec', 'flush_period_s': 0.5, 'bag': False})
    s.wait(lambda: s.pub_command.get_subscription_count() >= 1
           and s.pub_label.get_subscription_count() >= 1
           and s.pub_teleop.get_subscription_count() >= 1 and s.label_client.service_is_ready()
           and s.state().get('phase') == 'idle', 60, 'the graph to come up')
    yield s
    s.close()


def test_a_whole_episode_closed_by_a_success_label(session):
    s = session
    s.command('start')
    s.wait_phase('running', 0)
    count = len(s.actions)
    s.wait(lambda: len(s.actions) >= count + 3, 20, 'three actions in episode 0')
    s.label(success=True, source='pedal')
    s.wait(lambda: s.result(0) is not None, 10, 'the result of episode 0')
    result = s.result(0)
    assert (result['success'], result['late'], result['label_source']) == (True, False, 'pedal')
    assert result['reward'] == 0.0 and result['terminal']
    s.wait(lambda: s.closed(0), 20, 'the transitions of episode 0 to close')
    steps = s.episode_steps(0)
    assert len(steps) >= 4 and steps[-1].is_terminal
    assert [st.reward for st in steps[:-1]] == [-1.0] * (len(steps) - 2) + [0.0]
    assert not any(st.intervention for st in steps)


def test_step_limit_then_a_late_label_and_rejected_labels(session):
    s = session
    s.command('start')
    s.wait_phase('running', 1)
    s.wait(lambda: s.state().get('phase') == 'idle' and s.state().get('awaiting_label') == [1],
           30, 'episode 1 to end at the step limit, awaiting a label')
    assert s.result(1) is None
    response = s.call_label(True)  # late, through the service
    assert response.success, response.message
    s.wait(lambda: s.result(1) is not None, 10, 'the late result of episode 1')
    result = s.result(1)
    assert (result['success'], result['late'], result['ended_by']) == (True, True, 'step limit')
    assert result['steps'] == MAX_STEPS and result['label_source'] == 'service'
    s.wait(lambda: s.closed(1), 20, 'the transitions of episode 1 to close')
    assert s.episode_steps(1)[-1].is_terminal and len(s.episode_steps(1)) >= MAX_STEPS + 1

    count = len(s.feedback)
    s.label(success=True, episode=99)
    s.label(success=False, episode=0)
    s.label(success='yes')
    s.wait(lambda: len(s.feedback) >= count + 3, 10, 'feedback on three bad labels')
    reasons = [f['reason'] for f in s.feedback[count:]]
    assert not any(f['accepted'] for f in s.feedback[count:])
    assert 'episode 99 does not exist (episodes: 0..1)' in reasons[0]
    assert 'episode 0 is already labelled success (by pedal)' in reasons[1]
    assert 'label.success must be true or false' in reasons[2]
    response = s.call_label(False)
    assert not response.success and 'no running episode' in response.message
    assert s.result(0)['success'] and len(s.results) == 2  # nothing changed


def test_pause_stops_actions_and_resume_restarts_them(session):
    s = session
    s.command('start')
    s.wait_phase('running', 2)
    count = len(s.actions)
    s.wait(lambda: len(s.actions) >= count + 1, 20, 'an action in episode 2')
    s.command('pause')
    s.wait_phase('paused', 2, 10)
    s.spin_for(0.6)  # an action already in flight may still arrive
    paused_at = len(s.actions)
    s.spin_for(1.5)
    assert len(s.actions) == paused_at, 'actions were sent while paused'
    s.command('pause')
    s.wait_phase('running', 2, 10)
    s.wait(lambda: len(s.actions) >= paused_at + 1, 10, 'actions after resuming')


def test_takeover_runs_the_teleop_action_and_a_lost_device_holds(session):
    from std_msgs.msg import Float32MultiArray

    from robot_rl.nodes.conversions import floats_to_multiarray
    s = session
    s.command('takeover')
    s.spin_for(0.5)
    start = time.monotonic()
    for _ in range(8):  # the device speaks at 5 Hz for 1.6 s
        s.pub_teleop.publish(floats_to_multiarray(Float32MultiArray, np.array(TELEOP)))
        s.spin_for(0.2)
    taken = [a for t, a in s.actions if t > start]
    assert any(np.allclose(a, TELEOP) for a in taken), taken
    s.spin_for(1.2)  # the device goes quiet: past teleop_timeout_s
    lost = len(s.actions)
    s.wait(lambda: len(s.actions) >= lost + 3, 10, 'actions after the device went quiet')
    for _, a in s.actions[lost:]:
        np.testing.assert_array_equal(a[:6], np.zeros(6))  # a hold, never the policy
    s.command('success')
    s.wait(lambda: s.result(2) is not None, 10, 'the result of episode 2')
    s.command('takeover')  # hand back
    s.wait(lambda: s.closed(2), 20, 'the transitions of episode 2 to close')
    steps = s.episode_steps(2)
    flagged = [st for st in steps if st.intervention]
    assert flagged and all(np.allclose(st.action, TELEOP) or np.allclose(st.action[:6], 0)
                           for st in flagged)
    assert any(np.allclose(st.action, TELEOP) for st in flagged)
    assert not steps[0].intervention  # the policy acted before the takeover


def test_estop_wins_and_the_stopped_episode_takes_a_late_label(session):
    s = session
    s.command('start')
    s.wait_phase('running', 3)
    count = len(s.actions)
    s.wait(lambda: len(s.actions) >= count + 1, 20, 'an action in episode 3')
    s.command('estop')
    s.wait(lambda: s.state().get('phase') == 'estop', 10, 'the e-stop')
    s.spin_for(0.5)
    stopped_at = len(s.actions)
    s.spin_for(1.5)
    assert len(s.actions) == stopped_at, 'actions were sent under the e-stop'
    s.command('start')  # rejected: the e-stop must be released first
    s.wait(lambda: 'cannot start an episode while estop' in s.state().get('message', ''), 10,
           'the rejected start')
    s.command('failure')
    s.wait(lambda: s.result(3) is not None, 10, 'the result of episode 3')
    assert (s.result(3)['ended_by'], s.result(3)['late'], s.result(3)['success']) == (
        'estop', True, False)
    s.command('release')
    s.wait(lambda: s.state().get('phase') == 'idle', 10, 'the release')
    assert 'e-stop engaged' in s.procs['sim'].log()


def test_recorder_writes_labels_and_interventions_into_rlds(session):
    s = session
    directory = s.tmp / 'rec' / 'rlds' / 'robot_rl_episodes' / '1.0.0'
    from robot_rl.data.rlds import iter_episodes

    def labelled():
        if not directory.is_dir():
            return False
        try:
            found = {e.metadata['episode']: e for e in iter_episodes(directory)}
        except ValueError:  # the dataset is being rewritten
            return False
        return all(k in found and 'label' in found[k].metadata for k in (0, 1, 2))
    s.wait(labelled, 60, 'RLDS episodes 0-2 with their labels')
    episodes = {e.metadata['episode']: e for e in iter_episodes(directory)}
    assert episodes[1].metadata['label']['late'] and episodes[1].success
    assert episodes[2].metadata['intervention_steps']
    assert 'intervention_steps' not in episodes[0].metadata
    flagged = episodes[2].metadata['intervention_steps']
    assert any(np.allclose(episodes[2].actions[i], TELEOP) for i in flagged)
