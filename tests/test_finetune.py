"""PA-RL online fine-tuning (robot_rl/rl/finetune.py): the loop, its checkpoints, its processes.

Small random policies and critics stand in for the pre-trained ones (same classes, same files);
episodes run in the real MuJoCo scene at 64 px.
"""

import dataclasses
import json
import os
from pathlib import Path
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import policies  # noqa: F401  (registers every policy class)
from policies.base import POLICIES
from policies.common import load_policy, save_policy
from robot_rl.envs import make_env, TASKS
from robot_rl.models.checkpoint import read_checkpoint
from robot_rl.models.critic import Critic, CriticConfig, load_critic, save_critic
from robot_rl.rl import finetune as ft
from robot_rl.rl.calql import CalQLConfig
from robot_rl.rl.parl import PARLConfig
from robot_rl.transport import StepBatch, StepRecord
from robot_rl.transport.link import ActorLink
from robot_rl.types import ActionSpace

TASK = 'carrot_on_plate'
IMAGE = 64
HEADS = {'gaussian': dict(hidden_dims=(32, 32)),
         'diffusion': dict(hidden=32, blocks=1, diffusion_steps=5, sample_steps=2),
         'autoregressive': dict(d_model=32, layers=1, heads=2, bins=32)}
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def pretrained(directory: Path, name: str = 'diffusion', state_dim: int = 0) -> ft.LearnerConfig:
    """A random `name` policy and critic (reading the robot state when state_dim > 0) saved
    as robot-rl-train-bc / -critic would."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = POLICIES[name](horizon=2, encoder=dict(depth=10, width=8, image_size=IMAGE),
                            **HEADS[name])
    save_policy(directory / 'policy.safetensors', policy)
    torch.manual_seed(0)
    critic = Critic(CriticConfig(encoder_depth=10, encoder_width=8, hidden_dims=(32, 32),
                                 state_dim=state_dim))
    save_critic(directory / 'critic.safetensors', critic, ActionSpace.bridge())
    return ft.LearnerConfig(
        policy_path=str(directory / 'policy.safetensors'),
        critic_path=str(directory / 'critic.safetensors'), offline_ratio=0.0,
        warmup_episodes=1, updates_per_step=0.1, batch_size=8, checkpoint_every=5,
        publish_every=2, algo=CalQLConfig(gamma=0.98, num_samples=2),
        parl=PARLConfig(num_samples=4, top_m=2, gradient_steps=1))


def policy_tensors(path) -> dict:
    return {k: v.clone() for k, v in load_policy(path).state_dict().items()}


@pytest.mark.parametrize('name', ['diffusion', 'autoregressive', 'gaussian'])
def test_the_loop_finetunes_every_policy_class(tmp_path, name):
    cfg = pretrained(tmp_path / 'pretrained', name)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
    env = make_env(TASK, image_size=IMAGE)
    plan = ft.episode_plan([TASK], 3, seed=0)
    summaries = ft.run_sync(learner, actor, {TASK: env}, {TASK: TASKS[TASK].instruction}, plan)

    assert [s['episode'] for s in summaries] == [0, 1, 2]
    # Warm-up episode 0 triggers no update; then 0.1 updates per stored transition.
    transitions = [e.num_transitions for e in learner.online.episodes()]
    assert learner.updates == int(0.1 * sum(transitions[1:])) > 0
    assert actor.version == learner.version > 0  # the actor runs the newest weights
    before = policy_tensors(cfg.policy_path)
    after = policy_tensors(tmp_path / 'run' / 'checkpoints' / 'last' / 'policy.safetensors')
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = (tmp_path / 'run' / ft.CURVE_FILE).read_text().splitlines()
    curve = [json.loads(line) for line in lines]
    assert [c['warmup'] for c in curve] == [True, False, False]
    assert [c['success'] for c in curve] == [s['success'] for s in summaries]
    # Actions are stored in the critic's units: inside [-1, 1].
    assert all(np.abs(e.actions).max() <= 1.0 for e in learner.online.episodes())


def test_the_loop_runs_with_a_critic_that_reads_the_robot_state(tmp_path):
    cfg = pretrained(tmp_path / 'pretrained', state_dim=7)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
    env = make_env(TASK, image_size=IMAGE)
    ft.run_sync(learner, actor, {TASK: env}, {TASK: TASKS[TASK].instruction},
                ft.episode_plan([TASK], 3, seed=0))
    assert learner.updates > 0 and actor.version == learner.version
    saved = load_critic(tmp_path / 'run' / 'checkpoints' / 'last' / 'critic.safetensors')
    assert saved.critic.config.state_dim == 7
    initial = load_critic(cfg.critic_path).critic.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in saved.critic.state_dict().items())


def test_a_restarted_learner_resumes_its_replay_and_checkpoint(tmp_path):
    cfg = pretrained(tmp_path / 'pretrained')
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
    env = make_env(TASK, image_size=IMAGE)
    plan = ft.episode_plan([TASK], 2, seed=0)
    ft.run_sync(learner, actor, {TASK: env}, {TASK: TASKS[TASK].instruction}, plan)
    learner.update()  # one more update after the last checkpoint: lost on restart, by design
    saved = read_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last' / 'state.safetensors')[1]

    again = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    assert again.updates == saved['extra']['updates'] == learner.updates - 1
    assert again.version == learner.version and again.episodes == 2
    assert again.online.num_transitions == learner.online.num_transitions
    for k, v in again.policy.state_dict().items():  # the checkpointed weights, not the BC ones
        assert torch.equal(v, policy_tensors(
            tmp_path / 'run' / 'checkpoints' / 'last' / 'policy.safetensors')[k])
    assert again.policy_opt.state_dict()['state']  # optimiser moments restored, not reset
    # Re-delivered steps of a stored episode are ignored, and still count as durable.
    records, _ = actor.run_episode(env, TASKS[TASK].instruction, seed=plan[0][1])
    batch = ft.StepBatch(actor.name, 0, TASKS[TASK].instruction, 0, records)
    assert again.ingest(batch) == [] and again.durable(batch) and again.episodes == 2


def test_an_unwritable_or_full_checkpoint_directory_stops_the_learner(tmp_path):
    cfg = pretrained(tmp_path / 'pretrained')
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    first = learner.save()
    learner.updates += 1  # a new step directory is due

    # Disk full: file writes past 64 KiB fail (EFBIG), as ENOSPC would mid-write.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ft.LearnerStopped, match='cannot write a checkpoint.*intact'):
            learner.save()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    root = tmp_path / 'run' / 'checkpoints'
    assert (root / 'last').resolve() == first.resolve()
    assert sorted(p.name for p in root.iterdir()) == ['last', first.name]  # no half-written dir
    load_policy(root / 'last' / 'policy.safetensors')  # still loads

    # Unwritable: the checkpoint root is a regular file.
    other = ft.Learner(cfg, tmp_path / 'run2', torch.device('cpu'))
    (tmp_path / 'run2' / 'checkpoints').write_text('not a directory')
    with pytest.raises(ft.LearnerStopped, match='run2/checkpoints'):
        other.save()


def attempt(episode: int, success: bool, steps: int = 6) -> StepBatch:
    """An actor's episode whose action t is t / 100 in every motion dimension."""
    rng = np.random.default_rng(episode)
    records = [StepRecord(step=t, image=rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8),
                          state=np.zeros(7, np.float32),
                          action=np.array([t / 100] * 6 + [1.0], np.float32),
                          reward=0.0 if success and t == steps - 2 else -1.0, is_first=t == 0,
                          is_last=t == steps - 1, is_terminal=success and t == steps - 1)
               for t in range(steps)]
    return StepBatch('robot', episode, TASKS[TASK].instruction, episode, records)


def test_distillation_clones_successful_episodes_beside_the_critics_choices(
        tmp_path, monkeypatch):
    cfg = dataclasses.replace(pretrained(tmp_path / 'pretrained'), warmup_episodes=0,
                              bc_ratio=0.5)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    distilled = []
    real_distil = ft.parl.distil
    monkeypatch.setattr(ft.parl, 'distil', lambda policy, opt, batch, clip: (
        distilled.append(batch), real_distil(policy, opt, batch, clip))[1])

    learner.ingest(attempt(0, success=False))
    assert len(learner.successes) == 0
    learner.update()  # nothing to clone yet: every row is the critic's choice
    assert len(distilled[-1].actions) == cfg.batch_size

    learner.ingest(attempt(1, success=True))
    assert len(learner.successes) == 1
    learner.update()
    batch = distilled[-1]
    space = learner.policy.action_space
    half = cfg.batch_size // 2
    cloned = space.unnormalise(batch.actions[half:].numpy())
    # The cloned half is chunks of the successful episode: actions t / 100, t + 1 next.
    assert set(np.round(cloned[:, 0, 0] * 100).astype(int)) <= set(range(5))
    both = batch.mask[half:, 1].numpy() > 0
    np.testing.assert_allclose(cloned[both, 1, 0] - cloned[both, 0, 0], 0.01, atol=1e-4)

    # A second success is drawn beside the first (its own part, nothing rebuilt).
    learner.ingest(attempt(2, success=True))
    drawn = learner.successes.sample(64, np.random.default_rng(0))
    assert len(learner.successes) == 2 and len({img.tobytes() for img in drawn.images}) > 5

    restarted = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    assert len(restarted.successes) == 2  # back from the on-disk replay, in robot units
    first = space.unnormalise(restarted.successes.sample(64, np.random.default_rng(1)).actions)
    np.testing.assert_allclose(first[:, 0, 0], np.round(first[:, 0, 0] * 100) / 100, atol=1e-5)
    assert set(np.round(first[:, 0, 0] * 100).astype(int)) <= set(range(5))


def test_a_lagging_acting_policy_samples_acts_and_follows_the_distilled_one(
        tmp_path, monkeypatch):
    cfg = dataclasses.replace(pretrained(tmp_path / 'pretrained'), warmup_episodes=0,
                              bc_ratio=0.0, policy_tau=0.25)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    assert learner.acting is not learner.policy
    sampled_from = []
    real_batch = ft.parl.distillation_batch
    monkeypatch.setattr(ft.parl, 'distillation_batch', lambda policy, *args, **kwargs: (
        sampled_from.append(policy), real_batch(policy, *args, **kwargs))[1])
    learner.ingest(attempt(0, success=True))
    acting_before = {k: v.clone() for k, v in learner.acting.state_dict().items()}
    learner.update()

    assert sampled_from == [learner.acting]  # candidates come from the acting copy
    distilled = learner.policy.state_dict()
    moved = 0
    for k, before in acting_before.items():
        expected = before + 0.25 * (distilled[k] - before)
        torch.testing.assert_close(learner.acting.state_dict()[k], expected)
        moved += not torch.equal(before, distilled[k])
    assert moved > 0  # the distillation step changed the policy, the acting copy a quarter
    streamed = ft.decode_weights(learner.publish()).tensors
    for k, v in learner.acting.state_dict().items():
        np.testing.assert_allclose(streamed[f'policy.{k}'], v.numpy())

    learner.save()
    last = tmp_path / 'run' / 'checkpoints' / 'last'
    restarted = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    for mine, theirs in ((learner.acting, restarted.acting), (learner.policy, restarted.policy)):
        for k, v in mine.state_dict().items():
            assert torch.equal(v, theirs.state_dict()[k])
    saved = policy_tensors(last / ft.POLICY_FILE)  # what users deploy: the acting policy
    assert all(torch.equal(saved[k], v) for k, v in learner.acting.state_dict().items())
    assert (last / ft.DISTILLED_FILE).exists()

    frozen = dataclasses.replace(cfg, policy_tau=0.0)
    pinned = ft.Learner(frozen, tmp_path / 'run0', torch.device('cpu'))
    pinned.ingest(attempt(0, success=True))
    pinned.update()
    for k, v in policy_tensors(cfg.policy_path).items():  # tau 0: the pre-trained policy acts
        assert torch.equal(pinned.acting.state_dict()[k], v)
    with pytest.raises(ValueError, match='policy_tau'):
        ft.Learner(dataclasses.replace(cfg, policy_tau=1.5), tmp_path / 'run1',
                   torch.device('cpu'))


def test_a_fixed_critic_stays_as_loaded_while_the_policy_learns(tmp_path):
    cfg = dataclasses.replace(pretrained(tmp_path / 'pretrained'), warmup_episodes=0,
                              train_critic=False)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    loaded = {k: v.clone() for k, v in learner.calql.critic.state_dict().items()}
    learner.ingest(attempt(0, success=True))
    policy_before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    for _ in range(3):
        stats = learner.update()
    assert set(stats) == {'loss_policy'}  # no critic step was taken
    for k, v in learner.calql.critic.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    assert any(not torch.equal(v, policy_before[k])
               for k, v in learner.policy.state_dict().items())

    learning = ft.Learner(dataclasses.replace(cfg, train_critic=True), tmp_path / 'run1',
                          torch.device('cpu'))
    learning.ingest(attempt(0, success=True))
    assert 'loss_td' in learning.update()
    assert any(not torch.equal(v, loaded[k])
               for k, v in learning.calql.critic.state_dict().items())


def test_bad_weights_are_never_loaded(tmp_path, caplog):
    cfg = pretrained(tmp_path / 'pretrained')
    models = ft.Models(cfg, torch.device('cpu'), 0)
    actor = ft.Actor(models, cfg.parl)
    wrong = ft.Models(pretrained(tmp_path / 'other', 'gaussian'), torch.device('cpu'), 0)
    message = ft.weights_message(wrong.policy, wrong.critic, version=3)
    before = policy_tensors(cfg.policy_path)
    assert not actor.load(ft.decode_weights(message))
    assert actor.version == 0 and 'keeping version 0' in caplog.text
    for k, v in actor.policy.state_dict().items():
        assert torch.equal(v, before[k])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_learner(tmp_path: Path, cfg: ft.LearnerConfig, port: int, episodes: int):
    args = [sys.executable, '-m', 'robot_rl.cli.finetune', 'mode=learner', f'port={port}',
            f'output_dir={tmp_path}', 'run_name=run', f'tasks=[{TASK}]', f'episodes={episodes}',
            'threads=1', 'device=cpu', f'learner.policy_path={cfg.policy_path}',
            f'learner.critic_path={cfg.critic_path}', 'learner.offline_ratio=0',
            'learner.warmup_episodes=1', 'learner.updates_per_step=0.5', 'learner.batch_size=8',
            'learner.checkpoint_every=4', 'learner.publish_every=2', 'learner.algo.num_samples=2',
            'learner.parl.num_samples=4', 'learner.parl.top_m=2', 'learner.parl.gradient_steps=1']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.1)


def test_killing_the_learner_three_times_loses_no_transition(tmp_path):
    cfg = pretrained(tmp_path / 'pretrained')
    port, episodes = free_port(), 5
    run = tmp_path / 'run'
    learner = start_learner(tmp_path, cfg, port, episodes)
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl, 'actor-under-test')
    link = ActorLink('127.0.0.1', port, retry_s=0.2)
    timing = ft.ActorTiming()
    plan = ft.episode_plan([TASK], 1 + episodes, seed=0)

    def act():  # the scene renders through EGL: create it on the thread that steps it
        env = make_env(TASK, image_size=IMAGE)
        ft.run_actor(actor, link, {TASK: env}, {TASK: TASKS[TASK].instruction}, plan,
                     control_hz=10.0, send_every=5, timing=timing)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    updates_at_kill = []
    try:
        for _ in range(3):
            wait_for(lambda: (run / 'checkpoints' / 'last').exists() and learner.poll() is None
                     and link.connected, 240, 'a learner checkpoint')
            time.sleep(1.0)
            learner.send_signal(signal.SIGKILL)
            learner.wait()
            updates_at_kill.append(read_checkpoint(
                run / 'checkpoints' / 'last' / 'state.safetensors')[1]['extra']['updates'])
            steps_before = len(timing.starts)
            time.sleep(1.5)  # the actor keeps stepping while no learner exists
            assert len(timing.starts) > steps_before + 5 or not thread.is_alive()
            learner = start_learner(tmp_path, cfg, port, episodes)
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert link.wait_until_acked(timeout=120), f'{link.unacked} batches never acknowledged'
        assert learner.wait(timeout=240) == 0, learner.stderr.read().decode()[-2000:]
    finally:
        link.close()
        if learner.poll() is None:
            learner.kill()
    # Every step the actor produced is in the learner's replay, exactly once.
    from robot_rl.data.replay import ReplayBuffer
    replay = ReplayBuffer(run / 'replay')
    assert len(replay) == len(plan)
    assert replay.num_steps == len(timing.starts) + len(plan)  # + each episode's final step
    # Training continued from the last checkpoint after each restart.
    final = read_checkpoint(run / 'checkpoints' / 'last' / 'state.safetensors')[1]['extra']
    assert updates_at_kill == sorted(updates_at_kill)
    assert final['updates'] > updates_at_kill[-1]
    assert link.abandoned == 0


def test_the_learner_rejects_a_corrupted_batch_and_stores_it_when_resent(tmp_path):
    from robot_rl.transport.envelope import decode
    from robot_rl.transport.link import FrameReader, frame, LearnerServer
    from robot_rl.transport.steps import encode_steps

    cfg = pretrained(tmp_path / 'pretrained')
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
    records, _ = actor.run_episode(make_env(TASK, image_size=IMAGE), TASKS[TASK].instruction, 0)
    good = encode_steps(records, actor='a', episode=0, instruction=TASKS[TASK].instruction,
                        seq=4, image_format='png')
    broken = bytearray(good)
    broken[-100] ^= 0xFF
    server = LearnerServer('127.0.0.1', 0)
    thread = threading.Thread(target=ft.run_learner, args=(learner, server, 1), daemon=True)
    thread.start()
    reader = FrameReader()

    def next_message(sock):
        while True:
            messages = list(reader.feed(sock.recv(1 << 20)))
            if messages:
                assert len(messages) == 1
                return decode(messages[0])
    try:
        with socket.create_connection(('127.0.0.1', server.port), timeout=30) as sock:
            assert next_message(sock).schema == 'robot_rl.weights/1'  # the current weights
            sock.sendall(frame(bytes(broken)))
            nack = next_message(sock)
            assert (nack.number, nack.meta['ok']) == (4, False) and 'sha256' in nack.meta['reason']
            assert learner.episodes == 0  # nothing of it was stored
            sock.sendall(frame(good))
            ack = next_message(sock)
            assert (ack.number, ack.meta['ok']) == (4, True)
            thread.join(timeout=60)
    finally:
        server.close()
    assert not thread.is_alive() and learner.episodes == 1
    assert learner.online.num_steps == len(records)
