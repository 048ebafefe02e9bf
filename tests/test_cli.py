"""Smoke-run the console scripts with tiny budgets, as a user would (real hydra, real files)."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np

BIN = Path(sys.executable).parent


def run_script(name, *overrides, cwd):
    result = subprocess.run([str(BIN / name), *overrides], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_gen_data_writes_a_bridge_dataset_with_returns(tmp_path):
    from robot_rl.data.rlds import iter_episodes

    out = run_script('robot-rl-gen-data', 'tasks=[carrot_on_plate,stack_blocks]',
                     'episodes_per_task=3', 'val_fraction=0.34', 'image_size=64',
                     'expert=clean', f'output_dir={tmp_path}', cwd=tmp_path)
    directory = tmp_path / 'robot_rl_sim' / '1.0.0'
    assert str(directory) in out
    train = list(iter_episodes(directory, 'train'))
    val = list(iter_episodes(directory, 'val'))
    assert (len(train), len(val)) == (4, 2)
    instructions = {e.language_instruction for e in train}
    assert instructions == {'put carrot on plate', 'stack the green block on the yellow block'}
    for episode in train + val:
        assert episode.images.shape[1:] == (64, 64, 3)
        assert episode.mc_returns is not None
        # A clean expert succeeds, so returns are those of a success: -(1 - g^k) / (1 - g).
        assert episode.success
        k = episode.num_transitions
        np.testing.assert_allclose(episode.mc_returns[0], -(1 - 0.99 ** (k - 1)) / 0.01,
                                   rtol=1e-4)


def test_gen_data_records_a_policys_own_attempts(tmp_path):
    from robot_rl.data.rlds import iter_episodes
    from robot_rl.envs import make_env

    policy = Path(__file__).resolve().parents[1] / 'robot_rl/checkpoints/sim/policy.safetensors'
    out = run_script('robot-rl-gen-data', 'tasks=[carrot_on_plate]', 'episodes_per_task=2',
                     'val_fraction=0', 'image_size=64', f'policy_path={policy}', 'seed=7',
                     f'output_dir={tmp_path}', 'name=attempts', cwd=tmp_path)
    assert 'Policy success: carrot_on_plate' in out
    episodes = list(iter_episodes(tmp_path / 'attempts' / '1.0.0', 'train'))
    assert len(episodes) == 2
    env = make_env('carrot_on_plate', image_size=64)
    for seed, episode in zip((7, 8), episodes):
        assert episode.metadata['policy'] == str(policy) and episode.metadata['seed'] == seed
        # The stored actions are the executed ones: replaying them rebuilds the episode.
        env.reset(seed=seed)
        for t in range(episode.num_transitions):
            obs, _, _, _, info = env.step(episode.actions[t])
            np.testing.assert_array_equal(obs['state'], episode.states[t + 1])
        assert info['success'] == episode.success


def test_gen_data_rejects_unknown_task(tmp_path):
    result = subprocess.run([str(BIN / 'robot-rl-gen-data'), 'tasks=[fold_laundry]',
                             f'output_dir={tmp_path}'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert 'fold_laundry' in result.stderr


def test_demo_runs_base_vgps_and_parl_on_the_shipped_checkpoints(tmp_path):
    out = run_script('robot-rl-demo', 'eval_episodes=1', 'finetune_episodes=1',
                     'learner.warmup_episodes=1', 'learner.updates_per_step=0.1',
                     'video_size=128', 'device=cpu', 'threads=1',
                     f'output_dir={tmp_path / "demo"}', cwd=tmp_path)
    assert '| base |' in out and '| V-GPS K=10 |' in out and '| PA-RL |' in out
    summary = json.loads((tmp_path / 'demo' / 'results.json').read_text())
    assert list(summary['arms']) == ['base', 'V-GPS K=10', 'PA-RL']
    for arm in summary['arms'].values():
        assert arm['tasks']['carrot_on_plate']['episodes'] == 1
    assert summary['finetune']['episodes'] == 1 and summary['finetune']['updates'] > 0
    fine_tuned = tmp_path / 'demo' / 'finetune' / 'checkpoints' / 'last' / 'policy.safetensors'
    assert fine_tuned.is_file() and (tmp_path / 'demo' / 'curve.png').stat().st_size > 10_000
    import imageio.v2 as imageio
    reader = imageio.get_reader(tmp_path / 'demo' / 'videos' / 'parl.mp4')
    frame = reader.get_data(0)
    assert frame.shape == (128, 128, 3) and frame.std() > 5  # a real rendered scene


def test_critic_ranking_follows_every_candidate_to_an_outcome(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / 'ranking.json'
    shipped = repo / 'robot_rl' / 'checkpoints' / 'sim' / 'critic'
    critics = [str(shipped), str(shipped / 'critic.safetensors')]  # target and online network
    result = subprocess.run([sys.executable, str(repo / 'scripts' / 'critic_ranking.py'),
                             '--episodes', '1', '--candidates', '3', '--rollouts', '2',
                             '--every', '10', '--until', '20', '--out', str(out),
                             '--critic', *critics],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    states = report['states']
    assert [s['step'] for s in states] == [10, 20]  # probed where asked, the episode went on
    for state in states:
        # Both critics scored the same 3 candidates, whose outcomes were rolled out once.
        assert sorted(state['q']) == sorted(critics) and len(state['outcome']) == 3
        for key in ('q', 'q_chunk_mean'):
            assert all(len(q) == 3 and np.all(np.isfinite(q)) for q in state[key].values())
        assert state['q'][critics[0]] != state['q'][critics[1]]
        assert state['q'] != state['q_chunk_mean']
        # Each outcome is a success rate over 2 rollouts.
        assert set(state['outcome']) <= {0.0, 0.5, 1.0}
    summary = report['summary']
    assert summary['states'] == 2 and sorted(summary['critics']) == sorted(critics)
    assert summary['mean_outcome'] == np.mean([s['outcome'] for s in states])


def test_spearman_of_the_ranking_script_matches_the_definition():
    import importlib.util
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('critic_ranking',
                                                  repo / 'scripts' / 'critic_ranking.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert module.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # Ties share their mean rank: ranks (1, 2, 3) against (1.5, 1.5, 3) -> sqrt(3) / 2.
    assert abs(module.spearman([1, 2, 3], [0.0, 0.0, 1.0]) - np.sqrt(3) / 2) < 1e-12
    assert np.isnan(module.spearman([1, 2, 3], [0.5, 0.5, 0.5]))


def test_self_distillation_trains_the_policy_on_the_chosen_targets(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    script = str(repo / 'scripts' / 'self_distillation.py')
    run_script('robot-rl-gen-data', 'tasks=[carrot_on_plate]', 'episodes_per_task=2',
               'val_fraction=0', 'image_size=64', 'expert=clean', f'output_dir={tmp_path}',
               cwd=tmp_path)
    data = str(tmp_path / 'robot_rl_sim' / '1.0.0')

    def probe(*args):
        out = tmp_path / 'report.json'
        result = subprocess.run([sys.executable, script, '--data', data, '--out', str(out),
                                 *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(out.read_text())

    # No updates: the same sampling seed draws the same chunks before and after.
    still = probe('--targets', 'self', '--updates', '0', '--episodes', '0')
    assert still['mean_abs_shift_of_samples'] == 0.0
    assert still['sample_std_per_dim_before'] == still['sample_std_per_dim_after']
    assert still['success_before'] is None and still['loss_first_10'] is None
    # Training on its own samples moves them; the policy is then run alone in the simulator.
    moved = probe('--targets', 'self', '--updates', '3', '--episodes', '1', '--lr', '1e-3')
    assert moved['mean_abs_shift_of_samples'] > 0.0 and moved['class'] == 'diffusion'
    assert moved['success_before'] in (0.0, 1.0) and moved['success_after'] in (0.0, 1.0)
    assert len(moved['sample_std_per_dim_after']) == 7
    assert np.isfinite(moved['loss_last_10'])
    refused = subprocess.run([sys.executable, script, '--data', data, '--updates', '-1'],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and '--updates' in refused.stderr


def test_failure_anatomy_classifies_each_episode_from_the_simulator(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    script = str(repo / 'scripts' / 'failure_anatomy.py')
    out = tmp_path / 'anatomy.json'
    critic = repo / 'robot_rl' / 'checkpoints' / 'sim' / 'critic'
    result = subprocess.run([sys.executable, script, '--episodes', '3', '--k', '3',
                             '--critic', str(critic), '--out', str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    episodes, summary = report['episodes'], report['summary']
    assert [e['seed'] for e in episodes] == [10000, 10001, 10002]
    for e in episodes:
        assert e['kind'] in ('success', 'never_lifted', 'lifted_not_placed')
        if e['kind'] != 'success':  # a failure is told apart by how high the carrot rose
            assert (e['lift_cm'] > 2) == (e['kind'] == 'lifted_not_placed'), e
        if e['closes']:
            assert len(e['first_close_offset_cm']) == 3
            assert all(np.isfinite(e['first_close_offset_cm']))
    assert sum(summary['kinds'].values()) == 3 and summary['k'] == 3
    refused = subprocess.run([sys.executable, script, '--k', '3'], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and '--critic' in refused.stderr
