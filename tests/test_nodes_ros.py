"""T1: the node executables as processes, driven from an rclpy test node (ros-jazzy wheels).

One graph (sim + policy + learner + recorder) is started for the module; the tests run in order
against it: an episode end to end, bad input, killing and restarting the learner, then the
recorder's outputs. Bounded: every wait has a timeout, episodes are 6 steps.
"""

import json
import signal

import numpy as np
import pytest
from ros_harness import Driver, ros_available

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

EPISODE_STEPS = 6


class Graph(Driver):
    """The node processes plus an rclpy test node recording what the graph publishes."""

    def __init__(self, tmp):
        super().__init__(tmp)
        from std_msgs.msg import Float32MultiArray, Int64, String, UInt8MultiArray

        from robot_rl.nodes.ros_common import COMMAND_QOS, history_qos, LATCHED_QOS
        self.actions, self.versions, self.status, self.batches = [], [], [], []
        self.node.create_subscription(Float32MultiArray, 'action', self._on_action, COMMAND_QOS)
        self.node.create_subscription(Int64, 'policy/version',
                                      lambda m: self.versions.append(m.data), LATCHED_QOS)
        self.node.create_subscription(String, 'learner/status',
                                      lambda m: self.status.append(json.loads(m.data)),
                                      COMMAND_QOS)
        self.node.create_subscription(UInt8MultiArray, 'transitions', self._on_batch,
                                      history_qos(1000))

    def _on_action(self, msg):
        self.actions.append((self.node.get_clock().now().nanoseconds * 1e-9,
                             np.array(msg.data, np.float32)))

    def _on_batch(self, msg):
        from robot_rl.nodes.conversions import uint8_multiarray_bytes
        from robot_rl.transport import decode_steps
        self.batches.append(decode_steps(uint8_multiarray_bytes(msg)))

    def closed_episodes(self):
        return {(b.actor, b.episode) for b in self.batches if any(s.is_last for s in b.steps)}

    def last_status(self):
        return self.status[-1] if self.status else {}


LEARNER_PARAMS = {'replay_dir': 'learner/replay', 'checkpoint_dir': 'learner/ckpt',
                  'publish_every': 20, 'update_rate_hz': 20.0, 'min_transitions': 4,
                  'batch_size': 8, 'device': 'cpu'}


@pytest.fixture(scope='module')
def graph(tmp_path_factory):
    g = Graph(tmp_path_factory.mktemp('t1'))
    g.start('sim', 'sim', {'task': 'stack_blocks', 'image_size': 64,
                           'max_episode_steps': EPISODE_STEPS})
    g.start('policy', 'policy', {'transitions.batch_steps': 3})
    g.start('learner', 'learner', LEARNER_PARAMS)
    g.start('recorder', 'recorder', {'output_dir': 'rec', 'flush_period_s': 0.5})
    yield g
    g.close()


def test_episode_end_to_end(graph):
    """Actions at 5 Hz within bounds; transitions reach the learner; newer weights are used."""
    from robot_rl.types import ActionSpace
    graph.wait(lambda: graph.last_status().get('version', 0) >= 1
               and len(graph.closed_episodes()) >= 2, 90, 'two episodes and weights v1')
    graph.wait(lambda: any(s.policy_version >= 1 for b in graph.batches for s in b.steps),
               30, 'a transition chosen with weights version >= 1')
    assert max(graph.versions) >= 1
    times = np.array([t for t, _ in graph.actions])
    period = np.median(np.diff(times[-15:]))
    # The control timer sets the rate (5 Hz); the wide band only tells 5 Hz from a wrong rate.
    assert 0.1 < period < 0.5, f'median action period {period:.3f} s, expected 0.2 s'
    space = ActionSpace.bridge()
    for _, a in graph.actions:
        assert a.shape == (7,) and np.all(a >= space.low) and np.all(a <= space.high)
    # The learner reports its counts at 1 Hz, so its status may trail the transitions seen here.
    graph.wait(lambda: graph.last_status().get('episodes', 0) >= 2, 30,
               'the learner to report two stored episodes')
    assert graph.last_status()['steps_received'] >= 2 * (EPISODE_STEPS + 1)


def test_bad_input_is_dropped_and_logged(graph):
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32MultiArray, String, UInt8MultiArray

    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.ros_common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
    n = graph.node
    pub_image = n.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
    pub_action = n.create_publisher(Float32MultiArray, 'action', COMMAND_QOS)
    pub_instr = n.create_publisher(String, 'instruction', LATCHED_QOS)
    pub_weights = n.create_publisher(UInt8MultiArray, 'weights', LATCHED_QOS)
    publishers = (pub_image, pub_action, pub_instr, pub_weights)
    # Every one matched first: a message sent before discovery completes never arrives.
    graph.wait(lambda: all(p.get_subscription_count() >= 1 for p in publishers), 10,
               'bad-input publishers matched')
    bad_images = [Image(encoding='yuv422', height=2, width=2, step=4, data=bytes(8)),
                  Image(encoding='rgb8', height=4, width=4, step=12, data=bytes(10)),
                  Image(encoding='rgb8', height=0, width=0, step=0, data=b'')]
    for img in bad_images:
        pub_image.publish(img)
        graph.wait(lambda: False or True, 0.3, 'publish')
        for _ in range(8):
            graph.executor.spin_once(timeout_sec=0.05)
    pub_action.publish(conv.floats_to_multiarray(Float32MultiArray, np.zeros(5)))
    pub_action.publish(conv.floats_to_multiarray(Float32MultiArray,
                                                 np.array([np.nan] + [0.0] * 6)))
    pub_instr.publish(String(data='   '))
    policy, sim = graph.procs['policy'], graph.procs['sim']
    bad_weights = conv.bytes_to_uint8_multiarray(UInt8MultiArray, b'RRLE' + bytes(40))

    def bad_weights_reported():
        # Weights are kept latest-only: the learner's next message can replace this one before
        # the node reads it, so it is sent until the node reports it.
        pub_weights.publish(bad_weights)
        graph.spin_for(0.2)
        return 'weights message dropped' in policy.log()
    graph.wait(bad_weights_reported, 20, 'the bad weights message to be logged')
    expected = {policy: ['unsupported image encoding', 'image data has 10 bytes',
                         'empty image', 'instruction dropped: empty instruction'],
                sim: ['action must have shape', 'non-finite entries']}
    graph.wait(lambda: all(e in p.log() for p, es in expected.items() for e in es), 20,
               'every bad input to be logged with its reason')
    count = len(graph.actions)
    graph.wait(lambda: len(graph.actions) >= count + 5, 10, 'actions after bad input')
    assert policy.alive() and sim.alive()


def test_learner_kill_and_restart_loses_no_transition(graph):
    graph.procs.pop('learner').stop(signal.SIGKILL)
    count = len(graph.actions)
    graph.wait(lambda: len(graph.actions) >= count + 3, 10, 'actions after the kill')
    version, count = max(graph.versions), len(graph.actions)
    graph.wait(lambda: len(graph.actions) >= count + 10, 10, 'actions while the learner is down')
    assert max(graph.versions) == version  # still acting with the last weights
    closed_while_down = set(graph.closed_episodes())
    graph.start('learner', 'learner', LEARNER_PARAMS)
    graph.wait(lambda: graph.last_status().get('episodes', 0) >= len(closed_while_down)
               and graph.last_status().get('version', 0) > version, 60,
               'the restarted learner to hold every closed episode and publish a newer version')
    from robot_rl.data.replay import ReplayBuffer
    stored = [(e.metadata['actor'], e.metadata['episode'])
              for e in ReplayBuffer(graph.tmp / 'learner' / 'replay').episodes()]
    assert len(stored) == len(set(stored)), 'an episode was stored twice'
    assert closed_while_down <= set(stored)


def test_recorder_outputs_read_back(graph):
    graph.wait(lambda: (graph.tmp / 'rec' / 'rlds' / 'robot_rl_episodes' / '1.0.0').is_dir(),
               30, 'the RLDS dataset')
    assert graph.procs.pop('recorder').stop(signal.SIGINT) == 0
    from robot_rl.data.rlds import iter_episodes
    episodes = list(iter_episodes(graph.tmp / 'rec' / 'rlds' / 'robot_rl_episodes' / '1.0.0'))
    assert episodes and all(len(e) == EPISODE_STEPS + 1 for e in episodes)
    ids = [(e.metadata['actor'], e.metadata['episode']) for e in episodes]
    assert len(set(ids)) == len(ids)  # the shutdown flush never writes an episode twice
    from rosbags.highlevel import AnyReader
    with AnyReader([graph.tmp / 'rec' / 'bag']) as reader:
        topics = {c.topic: c.msgcount for c in reader.connections}
        image_conn = next(c for c in reader.connections if c.topic == '/camera/image_raw')
        # The bad-input test's malformed frames are recorded too: look at the sim's frames.
        frames = [reader.deserialize(raw, image_conn.msgtype)
                  for _, _, raw in reader.messages(connections=[image_conn])]
    assert topics['/action'] > 0 and topics['/events'] > 0 and topics['/camera/image_raw'] > 0
    sim_frames = [m for m in frames if m.height == 64]
    assert sim_frames and all(m.encoding == 'rgb8' and m.width == 64 for m in sim_frames)


def trained_checkpoints(directory):
    """A small diffusion policy and critic saved as robot-rl-train-bc / -critic write them."""
    import torch

    from policies.common import save_policy
    from policies.diffusion import DiffusionPolicy
    from robot_rl.models.critic import Critic, CriticConfig, save_critic
    from robot_rl.types import ActionSpace

    space = ActionSpace.bridge()
    torch.manual_seed(0)
    save_policy(directory / 'policy.safetensors',
                DiffusionPolicy(space, encoder={'width': 8}, hidden=32, blocks=1))
    save_critic(directory / 'critic.safetensors',
                Critic(CriticConfig(encoder_depth=10, encoder_width=8, hidden_dims=(32,))), space)
    return space


def test_policy_node_steers_a_trained_policy_with_a_critic(tmp_path):
    """policy.checkpoint from robot-rl-train-bc (diffusion) + a critic: V-GPS in the node."""
    space = trained_checkpoints(tmp_path)
    g = Graph(tmp_path)
    try:
        g.start('sim', 'sim', {'task': 'carrot_on_plate', 'image_size': 64,
                               'max_episode_steps': EPISODE_STEPS})
        policy = g.start('policy', 'policy', {
            'policy.checkpoint': str(tmp_path / 'policy.safetensors'),
            'steering.critic_checkpoint': str(tmp_path / 'critic.safetensors'),
            # An ensemble of two copies: the ensemble path runs, choices as with one.
            'steering.ensemble_checkpoints': [str(tmp_path / 'critic.safetensors')],
            'steering.num_samples': 8, 'transitions.enabled': False})
        g.wait(lambda: len(g.actions) >= 10, 120, 'ten steered actions')
        assert 'V-GPS steering: K=8' in policy.log()
        assert policy.log().count('critic.safetensors') >= 2
        for _, a in g.actions:
            assert space.check(a) is not None and a[6] in (0.0, 1.0)  # sticky gripper: binary
    finally:
        g.close()


def test_learner_node_finetunes_policy_and_critic_with_parl(tmp_path):
    """sim + policy (steered) + learner (PA-RL): new policy and critic weights reach the actor."""
    trained_checkpoints(tmp_path)
    g = Graph(tmp_path)
    try:
        g.start('sim', 'sim', {'task': 'carrot_on_plate', 'image_size': 64,
                               'max_episode_steps': EPISODE_STEPS})
        g.start('policy', 'policy', {
            'policy.checkpoint': str(tmp_path / 'policy.safetensors'),
            'steering.critic_checkpoint': str(tmp_path / 'critic.safetensors'),
            'steering.num_samples': 4, 'transitions.batch_steps': 3})
        learner = g.start('learner', 'learner', {
            'device': 'cpu', 'update_rate_hz': 20.0,
            'finetune.policy_checkpoint': str(tmp_path / 'policy.safetensors'),
            'finetune.critic_checkpoint': str(tmp_path / 'critic.safetensors'),
            'finetune.run_dir': 'parl', 'finetune.overrides': [
                'learner.offline_ratio=0', 'learner.batch_size=8', 'learner.publish_every=2',
                'learner.checkpoint_every=4', 'learner.parl.num_samples=4',
                'learner.parl.top_m=2', 'learner.parl.gradient_steps=1']})
        g.wait(lambda: max(g.versions, default=0) >= 2, 240, 'PA-RL weights version 2')
        assert 'PA-RL on a Cal-QL critic' in learner.log()
        assert 'now acting with weights version' in g.procs['policy'].log()
        assert 'dropped' not in g.procs['policy'].log()
        # learner/status is published once a second: wait for one sent after version 2.
        g.wait(lambda: g.last_status().get('updates', 0) >= 4, 30, 'a status after 4 updates')
        assert g.last_status()['episodes'] >= 1
        assert (tmp_path / 'parl' / 'checkpoints' / 'last' / 'policy.safetensors').is_file()
    finally:
        g.close()
