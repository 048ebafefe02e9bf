"""T0 (no ROS): the episode state machine, labels, the action arbiter, keyboard teleoperation,
the actor's episode overlay and intervention segments."""

import io

import numpy as np
import pytest

from robot_rl.episodes import arbiter as arb
from robot_rl.episodes.interventions import (INTERVENTION_STEPS, intervention_segments,
                                             step_metadata)
from robot_rl.episodes.keyboard import (command_for_key, KEY_COMMANDS, KeyboardTeleop,
                                        RawTerminal, status_line, TELEOP_KEYS)
from robot_rl.episodes.manager import (CommandRejected, EpisodeManager, EXPIRED, IDLE,
                                       LabelRejected, ManagerConfig, PAUSED, RESETTING, RUNNING)
from robot_rl.episodes.overlay import EpisodeOverlay, EpisodeState, parse_result, parse_state
from robot_rl.transport import ActorTracker, decode_steps, encode_steps, StepRecord
from robot_rl.types import ActionSpace, Episode


def running(manager, now=0.0, instruction='stack the block'):
    manager.start(instruction, now)
    manager.reset_done(True, now)
    assert manager.phase == RUNNING
    return manager.episode


def test_a_whole_episode_ends_with_a_success_label():
    m = EpisodeManager(ManagerConfig(max_steps=50))
    assert m.phase == IDLE
    m.start('put the spoon on the towel', 0.0)
    assert m.phase == RESETTING
    m.reset_done(True, 1.0)
    assert (m.phase, m.episode, m.steps) == (RUNNING, 0, 0)
    for t in range(3):
        m.step(2.0 + t)
    result = m.label(True, 'keyboard', 6.0)
    assert m.phase == IDLE
    assert (result.episode, result.success, result.steps, result.late) == (0, True, 3, False)
    assert result.reward == 0.0 and result.terminal and result.ended_by == 'label'
    assert m.pop_results() == [result] and m.pop_results() == []


def test_failure_is_a_truncation_with_reward_minus_one():
    m = EpisodeManager()
    running(m)
    result = m.label(False, 'service', 1.0)
    assert (result.reward, result.terminal, result.success) == (-1.0, False, False)


def test_step_limit_ends_unlabelled_and_a_late_label_applies_within_the_window():
    m = EpisodeManager(ManagerConfig(max_steps=3, late_label_window_s=5.0))
    running(m)
    for t in range(3):
        m.step(float(t))
    assert m.phase == IDLE and m.awaiting_label == [0]
    assert m.pop_results() == []  # nothing closes before the label or the window
    running(m, now=3.0)  # the next episode runs while episode 0 awaits its label
    result = m.label(True, 'topic', 6.0, episode=0)
    assert (result.episode, result.success, result.late) == (0, True, True)
    assert result.ended_by == 'step limit'
    assert m.phase == RUNNING and m.episode == 1  # the running episode is untouched


def test_a_label_without_episode_goes_to_the_latest_ended_one():
    m = EpisodeManager(ManagerConfig(late_label_window_s=5.0))
    running(m)
    m.end(1.0)
    assert m.label(False, 'keyboard', 2.0).episode == 0


def test_an_expired_window_closes_as_failure_and_rejects_later_labels():
    m = EpisodeManager(ManagerConfig(late_label_window_s=2.0))
    running(m)
    m.end(1.0)
    with pytest.raises(LabelRejected, match='came 2.5 s after it ended; the late-label window '
                                            'is 2 s'):
        m.label(True, 'topic', 3.5, episode=0)
    m.tick(3.5)
    [result] = m.pop_results()
    assert (result.success, result.label_source, result.late) == (False, EXPIRED, True)
    with pytest.raises(LabelRejected, match='late-label window of episode 0 closed'):
        m.label(True, 'topic', 4.0, episode=0)


@pytest.mark.parametrize('episode, reason', [
    (7, 'episode 7 does not exist'), (-1, 'episode -1 does not exist'),
    ('0', 'episode must be an integer'), (True, 'episode must be an integer')])
def test_labels_for_episodes_that_do_not_exist_are_rejected(episode, reason):
    m = EpisodeManager()
    running(m)
    with pytest.raises(LabelRejected, match=reason):
        m.label(True, 'topic', 1.0, episode=episode)
    assert m.phase == RUNNING and m.pop_results() == []


def test_a_second_label_is_rejected_and_the_first_stands():
    m = EpisodeManager()
    running(m)
    m.label(True, 'keyboard', 1.0)
    with pytest.raises(LabelRejected, match='episode 0 is already labelled success '
                                            r'\(by keyboard\)'):
        m.label(False, 'topic', 1.5, episode=0)
    with pytest.raises(LabelRejected, match='no running episode and no ended episode'):
        m.label(False, 'topic', 1.5)
    assert [r.success for r in m.pop_results()] == [True]


def test_no_label_before_any_episode():
    with pytest.raises(LabelRejected, match=r'does not exist \(episodes: none yet\)'):
        EpisodeManager().label(True, 'topic', 0.0, episode=0)


def test_pause_and_resume_keep_the_episode_and_stop_counting():
    m = EpisodeManager(ManagerConfig(max_steps=10))
    running(m)
    m.step(0.1)
    m.pause()
    assert m.phase == PAUSED
    m.step(0.2)  # an action that still arrived while paused is not counted
    assert m.steps == 1
    with pytest.raises(CommandRejected, match='cannot pause while paused'):
        m.pause()
    m.resume()
    assert m.phase == RUNNING and m.episode == 0
    with pytest.raises(CommandRejected, match='cannot resume while running'):
        m.resume()


def test_estop_wins_from_every_phase_and_needs_a_release():
    m = EpisodeManager(ManagerConfig(late_label_window_s=10.0))
    running(m)
    m.pause()
    m.estop(1.0)
    assert m.phase == 'estop' and m.awaiting_label == [0]
    with pytest.raises(CommandRejected, match='while estop'):
        m.start('stack', 2.0)
    result = m.label(False, 'keyboard', 2.0)  # the stopped episode can still be labelled
    assert result.ended_by == 'estop' and result.late
    m.release()
    assert m.phase == IDLE
    with pytest.raises(CommandRejected, match='not engaged'):
        m.release()
    m.start('stack', 3.0)
    m.estop(3.5)  # during the reset routine too
    m.reset_done(True, 4.0)  # a late reset answer changes nothing
    assert m.phase == 'estop' and m.episode == 0


def test_reset_routine_times_out_and_failures_say_why():
    m = EpisodeManager(ManagerConfig(reset_timeout_s=2.0))
    m.start('stack', 0.0)
    m.tick(1.9)
    assert m.phase == RESETTING
    m.tick(2.0)
    assert m.phase == IDLE and 'reset timed out after 2 s' in m.message
    m.start('stack', 3.0)
    m.reset_done(False, 3.5, 'service reset unavailable')
    assert m.phase == IDLE and m.message == 'reset failed: service reset unavailable'
    assert m.episode == -1
    with pytest.raises(CommandRejected, match='without an instruction'):
        m.start('  ', 4.0)
    with pytest.raises(ValueError, match='reset_timeout_s'):
        ManagerConfig(reset_timeout_s=0)


# ------------------------------------------------------------------------------ the arbiter

def test_arbiter_priorities_estop_teleop_hold_policy():
    a = arb.ActionArbiter(teleop_timeout_s=0.5)
    assert a.decide(0.0).source == arb.POLICY
    a.set_intervention(True)
    hold = a.decide(0.0)  # taken over, no device message yet: hold, never the policy
    assert hold.source == arb.HOLD and not hold.intervention
    np.testing.assert_array_equal(hold.action, [0, 0, 0, 0, 0, 0, 1])
    a.teleop([0.01, 0, 0, 0, 0, 0, 0.0], now=1.0)
    d = a.decide(1.1)
    assert d.source == arb.TELEOP and d.intervention
    np.testing.assert_allclose(d.action, [0.01, 0, 0, 0, 0, 0, 0])
    again = a.decide(1.2)  # the same message runs once; the device is alive: hold still
    assert again.source == arb.TELEOP
    np.testing.assert_array_equal(again.action, [0, 0, 0, 0, 0, 0, 0])
    a.teleop([0.02, 0, 0, 0, 0, 0, 0.0], now=1.3)
    a.set_estop(True)
    assert a.decide(1.35) == arb.Decision(arb.ESTOP, None)  # the queued teleop action loses
    a.set_estop(False)
    a.sent(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    lost = a.decide(5.0)  # the device vanished mid-episode
    assert lost.source == arb.HOLD
    np.testing.assert_array_equal(lost.action, [0, 0, 0, 0, 0, 0, 0])
    a.set_intervention(False)
    assert a.decide(5.0).source == arb.POLICY


def test_arbiter_rejects_malformed_teleop_and_clips_large_moves():
    a = arb.ActionArbiter()
    with pytest.raises(ValueError, match='non-finite'):
        a.teleop([np.nan] * 7, 0.0)
    with pytest.raises(ValueError, match='shape'):
        a.teleop([0.0] * 6, 0.0)
    a.set_intervention(True)
    a.teleop([1.0, -1.0, 0, 0, 0, 3.0, 1.0], 0.0)
    np.testing.assert_allclose(a.decide(0.1).action, [0.05, -0.05, 0, 0, 0, 0.25, 1.0])
    with pytest.raises(ValueError, match='teleop_timeout_s'):
        arb.ActionArbiter(teleop_timeout_s=0)


# ------------------------------------------------------------------------------ keyboard

def test_key_map_covers_every_command_and_no_key_is_both():
    assert {command_for_key(k) for k in KEY_COMMANDS} == {
        'start', 'success', 'failure', 'end', 'pause', 'estop', 'release', 'takeover', 'quit'}
    assert command_for_key(' ') == 'estop'
    assert not set(KEY_COMMANDS) & (set(TELEOP_KEYS) | {'g'})
    assert command_for_key('i') is None


def test_keyboard_teleop_turns_keys_into_bounded_deltas():
    t = KeyboardTeleop(step_m=0.02, step_rad=0.1)
    for key in 'iiijuu,g':
        assert t.press(key)
    assert not t.press('z')
    action = t.action()
    space = ActionSpace.bridge()
    np.testing.assert_allclose(action, [0.05, 0.02, 0.04, 0, 0, 0.1, 0.0], atol=1e-6)
    assert np.all(action >= space.low) and np.all(action <= space.high)
    np.testing.assert_allclose(t.action(), [0, 0, 0, 0, 0, 0, 0.0])  # next period: no keys
    t.press('k')
    t.press('g')
    np.testing.assert_allclose(t.action(), [-0.02, 0, 0, 0, 0, 0, 1.0])


def test_raw_terminal_without_a_tty_reads_nothing():
    term = RawTerminal(io.StringIO('s'))
    assert not term.available and term.keys() == []
    term.close()


def test_status_line_shows_the_live_state():
    line = status_line({'phase': 'running', 'episode': 3, 'step': 12, 'awaiting_label': [2],
                        'message': ''}, np.array([0.01, 0, -0.02, 0, 0, 0, 1.0]), 7, 'teleop')
    assert line == ('[RUNNING] | ep 3 | step 12 | action +0.010 +0.000 -0.020 g1 | weights v7 | '
                    'control teleop | label? [2]')


# ------------------------------------------------------------------------------ actor side

def test_overlay_renumbers_steps_hides_the_robots_reward_and_applies_a_late_label():
    overlay, tracker = EpisodeOverlay(), ActorTracker()
    image = np.zeros((4, 4, 3), np.uint8)
    assert overlay.rewrite(1, np.zeros(7)) is None  # no manager state yet
    overlay.on_state(EpisodeState('running', 5, 'stack'))
    records = []
    for t in range(3):
        event = overlay.rewrite(100 + t, np.full(7, t, np.float32))
        assert (event.episode, event.step, event.done) == (5, t, False)
        records += tracker.observe(image, event)
        tracker.acted(image, event, np.full(7, 0.01, np.float32), 1, intervention=t == 1)
    assert [r.reward for r in records] == [-1.0, -1.0]
    assert [r.intervention for r in records] == [False, True]
    assert overlay.on_state(EpisodeState('paused', 5, 'stack')) is None
    assert overlay.rewrite(200, np.zeros(7)) is None  # paused: no step
    assert overlay.on_state(EpisodeState('idle', 5, 'stack')) == 5
    final = tracker.observe(image, overlay.final_event(5, 300, np.zeros(7)))
    assert overlay.hold(5, final) == [] and overlay.awaiting == [5]
    overlay.on_state(EpisodeState('running', 6, 'stack'))  # the next episode starts
    assert overlay.rewrite(400, np.zeros(7)).episode == 6
    closed = overlay.close(parse_result('{"episode": 5, "success": true, "reward": 0.0, '
                                        '"terminal": true}'))
    assert [(r.step, r.reward, r.is_last, r.is_terminal) for r in closed] == [
        (2, 0.0, False, False), (3, 0.0, True, True)]


def test_overlay_result_before_the_final_frame_is_kept():
    overlay = EpisodeOverlay()
    result = parse_result('{"episode": 2, "success": false, "reward": -1, "terminal": false}')
    assert overlay.close(result) == []
    records = [StepRecord(0, np.zeros((2, 2, 3), np.uint8), np.zeros(7), np.zeros(7), -1.0,
                          True, False, False),
               StepRecord(1, np.zeros((2, 2, 3), np.uint8), np.zeros(7), np.zeros(7), -1.0,
                          False, True, False)]
    closed = overlay.hold(2, records)
    assert [r.is_terminal for r in closed] == [False, False] and closed[0].reward == -1.0


@pytest.mark.parametrize('text, reason', [
    ('nope', 'not JSON'), ('[1]', 'JSON object'), ('{"phase": "dancing", "episode": 1}',
                                                   'phase must be one of'),
    ('{"phase": "running", "episode": "1"}', 'episode must be an integer')])
def test_bad_manager_states_are_rejected(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_state(text)


def test_bad_results_are_rejected():
    with pytest.raises(ValueError, match='success must be a boolean'):
        parse_result('{"episode": 1, "success": 1, "reward": 0}')
    with pytest.raises(ValueError, match='reward must be a finite number'):
        parse_result('{"episode": 1, "success": true, "reward": NaN}')


# ------------------------------------------------------------------------------ interventions

def test_intervention_flags_travel_in_step_batches():
    steps = [StepRecord(t, np.full((8, 8, 3), 40 * t, np.uint8), np.zeros(7), np.zeros(7), -1.0,
                        t == 0, t == 2, False, intervention=t == 1) for t in range(3)]
    back = decode_steps(encode_steps(steps, actor='a', episode=0, instruction='x', seq=0,
                                     image_format='png'))
    assert [s.intervention for s in back.steps] == [False, True, False]
    assert step_metadata(back.steps) == {INTERVENTION_STEPS: [1]}
    assert step_metadata(back.steps[:1]) == {}


def episode_with(flags, terminal):
    n = len(flags) + 1
    is_terminal = np.arange(n) == n - 1 if terminal else np.zeros(n, bool)
    rewards = np.full(n, -1.0, np.float32)
    if terminal:
        rewards[-2] = 0.0
    return Episode(images=np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(3, 3)
                   .repeat(2, 1).repeat(2, 2), states=np.zeros((n, 7), np.float32),
                   actions=np.arange(n * 7, dtype=np.float32).reshape(n, 7), rewards=rewards,
                   discounts=np.where(is_terminal, 0, 1).astype(np.float32),
                   is_first=np.arange(n) == 0, is_last=np.arange(n) == n - 1,
                   is_terminal=is_terminal, language_instruction='x',
                   metadata={'episode': 4, INTERVENTION_STEPS: [i for i, f in enumerate(flags)
                                                                if f]})


def test_intervention_segments_keep_their_next_observation_and_terminal():
    episode = episode_with([False, True, True, False, True], terminal=True)
    first, second = intervention_segments(episode)
    assert first.images[:, 0, 0, 0].tolist() == [1, 2, 3]  # steps 1, 2 + final obs 3
    assert first.num_transitions == 2 and not first.is_terminal.any()
    assert first.metadata == {'episode': 4, 'segment_start': 1}
    assert second.images[:, 0, 0, 0].tolist() == [4, 5]
    assert second.is_terminal[-1] and second.rewards[0] == 0.0
    np.testing.assert_array_equal(second.actions[0], episode.actions[4])
    assert intervention_segments(episode_with([False, False], terminal=False)) == []


def test_intervention_indices_out_of_range_are_rejected():
    episode = episode_with([True, False], terminal=False)
    episode.metadata[INTERVENTION_STEPS] = [2]
    with pytest.raises(ValueError, match=r'\[2\] are not steps that start a transition'):
        intervention_segments(episode)


def test_label_messages_parse_or_say_what_is_wrong():
    from robot_rl.episodes.manager import LabelMessage, parse_label
    assert parse_label('{"success": true}') == LabelMessage(True, None, 'topic')
    assert parse_label('{"success": false, "episode": 3, "source": "pedal"}') == LabelMessage(
        False, 3, 'pedal')
    for text, reason in (('yes', 'not JSON'), ('[true]', 'JSON object'),
                         ('{"success": 1}', 'success must be true or false'),
                         ('{"success": true, "episode": "2"}', 'episode must be an integer'),
                         ('{"success": true, "source": ""}', 'source must be a non-empty')):
        with pytest.raises(LabelRejected, match=reason):
            parse_label(text)
