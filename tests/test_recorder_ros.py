"""T1: the recorder node as a process: a restart continues its RLDS dataset and bag."""

import numpy as np
import pytest
from ros_harness import ros_available

reason = ros_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or '')

STEPS = 4


def episode_message(episode: int):
    from std_msgs.msg import UInt8MultiArray

    from robot_rl.nodes import conversions as conv
    from robot_rl.transport import encode_steps, StepRecord
    rng = np.random.default_rng(episode)
    steps = [StepRecord(step=i, image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                        state=np.zeros(7, np.float32),
                        action=np.full(7, episode / 10, np.float32), reward=-1.0,
                        is_first=i == 0, is_last=i == STEPS - 1, is_terminal=False)
             for i in range(STEPS)]
    return conv.bytes_to_uint8_multiarray(UInt8MultiArray, encode_steps(
        steps, actor='a', episode=episode, instruction=f'episode {episode}', seq=episode))


def record(driver, episodes, name):
    """Start a recorder, send whole episodes, stop it with SIGINT; its exit code."""
    from std_msgs.msg import UInt8MultiArray

    from robot_rl.nodes.ros_common import history_qos
    recorder = driver.start(name, 'recorder', {'output_dir': 'rec', 'flush_period_s': 0.2,
                                               'label_grace_s': 60.0})
    pub = driver.node.create_publisher(UInt8MultiArray, 'transitions', history_qos(100))
    driver.wait(lambda: pub.get_subscription_count() > 0, 60, f'{name} start')
    for episode in episodes:
        pub.publish(episode_message(episode))
    driver.spin_for(2.0)  # delivery; the 60 s grace keeps them in memory until the stop
    driver.node.destroy_publisher(pub)
    code = recorder.stop(timeout=30)
    del driver.procs[name]
    return code, recorder.log()


def test_restarted_recorder_continues_its_dataset_and_flushes_at_shutdown(ros_driver):
    from rosbags.highlevel import AnyReader

    from robot_rl.data.rlds import iter_episodes
    code, log = record(ros_driver, [0, 1], 'recorder_first')
    assert code == 0, log
    assert 'RLDS: 2 episodes appended' in log  # written at shutdown, inside the label grace
    code, log = record(ros_driver, [2], 'recorder_second')
    assert code == 0, log
    episodes = list(iter_episodes(ros_driver.tmp / 'rec' / 'rlds' / 'robot_rl_episodes' / '1.0.0'))
    assert [e.metadata['episode'] for e in episodes] == [0, 1, 2]
    assert [e.language_instruction for e in episodes] == ['episode 0', 'episode 1', 'episode 2']
    for e in episodes:
        # RLDS: the last step carries no action.
        np.testing.assert_allclose(e.actions[:-1], e.metadata['episode'] / 10, atol=1e-6)
    # Each run has its own bag; the first one is intact.
    bags = sorted(p.name for p in (ros_driver.tmp / 'rec').iterdir() if p.name.startswith('bag'))
    assert bags == ['bag', 'bag_1']
    with AnyReader([ros_driver.tmp / 'rec' / 'bag']) as reader:
        assert {c.topic for c in reader.connections} >= {'/action', '/camera/image_raw'}
