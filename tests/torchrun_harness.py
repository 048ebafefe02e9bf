"""Critic training under torchrun with gloo CPU ranks, for the DDP tests."""

import os
from pathlib import Path
import subprocess
import sys
from typing import Dict, List, Sequence

from safetensors.torch import load_file
import torch

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_critic_ranks(tmp_path: Path, nproc: int, overrides: Sequence[str]
                     ) -> List[Dict[str, torch.Tensor]]:
    """torchrun with `nproc` gloo CPU ranks; each saves its final critic as rank<r>.st."""
    worker = tmp_path / 'worker.py'
    worker.write_text(
        'import os, sys\n'
        'from omegaconf import OmegaConf\n'
        'from safetensors.torch import save_file\n'
        'import robot_rl.cli.train_critic  # noqa: F401\n'
        'from robot_rl.cli.config import compose\n'
        'from robot_rl.rl.train_critic import main\n'
        'result = main(OmegaConf.to_object(compose("train_critic", sys.argv[2:])))\n'
        'state = {k: v.contiguous() for k, v in result.algo.critic.state_dict().items()}\n'
        'save_file(state, os.path.join(sys.argv[1], f"rank{os.environ[\'RANK\']}.st"))\n')
    for old in tmp_path.glob('rank*.st'):
        old.unlink()
    command = [str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', str(nproc),
               str(worker), str(tmp_path), *overrides]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS='1')
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [load_file(tmp_path / f'rank{r}.st') for r in range(nproc)]
