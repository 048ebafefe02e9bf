"""robot-rl-train-critic: offline Cal-QL critic pre-training on Bridge-format data (V-GPS).

    robot-rl-train-critic                                   # V-GPS critic on the Bridge sample
    robot-rl-train-critic data=sim critic=tiny device=cpu steps=3000 batch_size=64
    robot-rl-train-critic data=sim algo.calibrate=false exp_name=cql      # plain CQL
    robot-rl-train-critic resume=true data=sim                # continue the newest such run
    torchrun --standalone --nproc_per_node 2 -m robot_rl.cli.train_critic data=sim
    robot-rl-train-critic --help                             # every option

Config groups: critic (vgps: ResNet-34, the published critic; tiny: ResNet-10 for CPU and
tests), data (bridge_debug, sim, mix). Fields and their meaning: robot_rl/rl/train_critic.py.
Reload and evaluate a checkpoint: python -m robot_rl.rl.evaluate_critic RUN/checkpoints/best
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from robot_rl.cli.config import hydra_main
from robot_rl.rl.train_critic import main as train, TrainCriticConfig

ConfigStore.instance().store(name='train_critic_schema', node=TrainCriticConfig)


def run(cfg: TrainCriticConfig) -> None:
    result = train(cfg)
    if result.metrics:
        summary = ', '.join(f'{k} {v:.3f}' for k, v in sorted(result.metrics.items()))
        print(f'step {result.step}: {summary}')
    print(f'Run: {result.run_dir}')


main = hydra_main('train_critic', run)


if __name__ == '__main__':
    main()
