"""T1: the episode manager node labelling episodes with a real success classifier checkpoint
(real rclpy, the node as a process).

The test publishes camera frames and executed actions (action_sent) itself, so no simulator or
policy runs; the classifier is a tiny real SuccessClassifier whose last layer is set so that it
is confident (p = 0.95) or unsure (p = 0.55) on every frame. Bounded: every wait has a timeout.
"""

import math

import numpy as np
import pytest
from ros_harness import ros_available
from test_episode_manager_ros import Session
from test_labeller import tiny_checkpoint

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

CONFIDENT_BIAS, UNSURE_BIAS = 3.0, 0.2


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


class ClassifierSession(Session):
    """The episode manager with a classifier; the driver publishes camera frames and executed
    actions (action_sent) itself."""

    def __init__(self, tmp):
        super().__init__(tmp)
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float32MultiArray

        from robot_rl.nodes.ros_common import COMMAND_QOS, SENSOR_QOS
        self.pub_image = self.node.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
        self.pub_sent = self.node.create_publisher(Float32MultiArray, 'action_sent',
                                                   COMMAND_QOS)
        self.frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def launch(self, bias, params):
        """The episode manager with a tiny classifier of output sigmoid(bias)."""
        path = tiny_checkpoint(self.tmp / 'classifier.safetensors', bias)
        self.proc = self.start('episode_manager', 'episode_manager', {
            'keyboard': False, 'reset_service': '', 'instruction': 'put the spoon on the towel',
            'late_label_window_s': 60.0, 'classifier_path': str(path), **params})
        self.wait(lambda: self.pub_image.get_subscription_count() >= 1
                  and self.pub_sent.get_subscription_count() >= 1
                  and self.pub_command.get_subscription_count() >= 1
                  and self.label_client.service_is_ready()
                  and self.state().get('phase') == 'idle', 60, 'the episode manager')
        return self

    def frames(self, seconds):
        """Camera frames at 10 Hz for `seconds` (best effort: several, so one arrives)."""
        from sensor_msgs.msg import Image
        from std_msgs.msg import Header

        from robot_rl.nodes.conversions import rgb_to_image
        for _ in range(max(1, int(seconds * 10))):
            self.pub_image.publish(rgb_to_image(Image, Header(frame_id='camera'), self.frame))
            self.spin_for(0.1)

    def executed(self, steps):
        """`steps` executed actions, each after a fresh camera frame."""
        from std_msgs.msg import Float32MultiArray
        for _ in range(steps):
            self.frames(0.3)
            self.pub_sent.publish(Float32MultiArray(data=[0.0] * 6 + [1.0]))
        self.frames(0.3)

    def run_episode(self, episode):
        self.command('start')
        self.wait_phase('running', episode)


@pytest.fixture
def classifier_session(tmp_path):
    session = ClassifierSession(tmp_path)
    yield session
    session.close()


def test_a_confident_classifier_labels_mid_episode_and_at_an_unlabelled_end(
        classifier_session):
    s = classifier_session.launch(CONFIDENT_BIAS, {'classifier_confidence': 0.8,
                                                   'classifier_check_every_steps': 2,
                                                   'max_episode_steps': 50})
    s.run_episode(0)
    s.executed(1)
    assert s.state().get('phase') == 'running'  # no check before step 2
    s.executed(1)
    s.wait(lambda: s.result(0) is not None, 20, 'the classifier to end episode 0')
    r = s.result(0)
    assert (r['success'], r['label_source'], r['ended_by'], r['late'], r['steps']) == (
        True, 'classifier', 'label', False, 2)
    assert r['classifier_probability'] == pytest.approx(sigmoid(CONFIDENT_BIAS), abs=1e-4)
    assert r['reward'] == 0.0 and r['terminal']

    s.run_episode(1)
    s.executed(1)
    s.command('end')  # ended unlabelled: the classifier judges the final frame
    s.wait(lambda: s.result(1) is not None, 20, 'the classifier to label episode 1')
    r = s.result(1)
    assert (r['success'], r['label_source'], r['ended_by'], r['late']) == (
        True, 'classifier', 'end', True)
    assert r['classifier_probability'] == pytest.approx(sigmoid(CONFIDENT_BIAS), abs=1e-4)
    assert 'classifier on episode 1 (final frame): success (p=0.95)' in s.proc.log()


def test_an_unsure_classifier_asks_and_a_persons_label_closes_the_episode(
        classifier_session):
    s = classifier_session.launch(UNSURE_BIAS, {'classifier_confidence': 0.8,
                                                'max_episode_steps': 3})
    s.run_episode(0)
    s.executed(3)  # the step limit: unlabelled, the classifier is unsure
    prompt = 'classifier unsure (p=0.55) about episode 0: label with s/f'
    s.wait(lambda: s.state().get('classifier') == prompt, 20, 'the classifier to ask')
    assert s.state()['awaiting_label'] == [0] and s.result(0) is None
    response = s.call_label(False)
    assert response.success, response.message
    s.wait(lambda: s.result(0) is not None, 10, 'the result of episode 0')
    r = s.result(0)
    assert (r['success'], r['label_source'], r['ended_by'], r['late']) == (
        False, 'service', 'step limit', True)
    assert r['classifier_probability'] == pytest.approx(sigmoid(UNSURE_BIAS), abs=1e-4)
    s.wait(lambda: 'classifier' not in s.state(), 10, 'the request to be withdrawn')
    assert prompt in s.proc.log()  # the status line showed it
