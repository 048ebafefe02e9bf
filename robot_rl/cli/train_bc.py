"""robot-rl-train-bc: behaviour cloning of a diffusion, autoregressive or Gaussian policy.

    robot-rl-train-bc                                          # diffusion policy on sim data
    robot-rl-train-bc policy=autoregressive data=bridge_debug steps=2000
    robot-rl-train-bc policy=gaussian successes_only=true
    robot-rl-train-bc resume=true                              # continue the newest such run
    robot-rl-train-bc --help                                   # every option

Config groups: policy (diffusion, autoregressive, gaussian), data (sim, bridge_debug, mix).
Fields and their meaning: robot_rl/rl/train_bc.py. The checkpoint RUN/checkpoints/best/
policy.safetensors is what robot-rl-eval and the policy node load.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from robot_rl.cli.config import hydra_main
from robot_rl.rl.train_bc import main as train, TrainBCConfig

ConfigStore.instance().store(name='train_bc_schema', node=TrainBCConfig)


def run(cfg: TrainBCConfig) -> None:
    result = train(cfg)
    if result.metrics:
        summary = ', '.join(f'{k} {v:.3f}' for k, v in sorted(result.metrics.items()))
        print(f'step {result.step}: {summary}')
    print(f'Run: {result.run_dir}')


main = hydra_main('train_bc', run)


if __name__ == '__main__':
    main()
