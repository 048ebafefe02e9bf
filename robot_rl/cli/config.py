"""Where the hydra configs live, for console scripts and ROS nodes alike.

One source of truth: the repository's `configs/` (editable installs, the tests) or the copy that
`setup.py` installs under `<prefix>/share/robot_rl/configs` (pip and colcon installs).
"""

from __future__ import annotations

import os
from pathlib import Path
import sys
from typing import Any, Callable, Sequence

CONFIG_DIR_ENV = 'ROBOT_RL_CONFIG_DIR'


def config_dir() -> Path:
    """The directory holding the hydra configs; ROBOT_RL_CONFIG_DIR overrides the search."""
    candidates = []
    if os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]))
    candidates += [Path(__file__).resolve().parents[2] / 'configs',
                   Path(sys.prefix) / 'share' / 'robot_rl' / 'configs']
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError('robot_rl configs not found; looked in '
                            + ', '.join(str(p) for p in candidates)
                            + f'. Set {CONFIG_DIR_ENV} to the configs directory.')


def compose(config_name: str, overrides: Sequence[str] = ()):
    """Build a config with hydra's compose API (what ROS nodes use instead of @hydra.main)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base='1.3'):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def hydra_main(config_name: str, run: Callable[[Any], Any]) -> Callable[[], None]:
    """A console-script `main`: @hydra.main on `config_name`, then `run(config dataclass)`.

    The YAML's first default is a dataclass schema stored in hydra's ConfigStore, so
    `OmegaConf.to_object` hands `run` a typed, validated object.
    """
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base='1.3')
    def main(cfg) -> None:
        run(OmegaConf.to_object(cfg))

    return main
