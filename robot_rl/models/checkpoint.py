"""Checkpoint files: safetensors for tensors plus a JSON sidecar, both written atomically.

`model.safetensors` holds the state dict; `model.json` beside it holds the config, the action
normaliser and versions. No pickle: `torch.load` is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
from typing import Any, Callable, Dict, Mapping, Tuple, Union

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import nn

PathLike = Union[str, Path]


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a `.safetensors` file."""
    return Path(path).with_suffix('.json')


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same directory, then rename over `path`.

    Any failure to write (a full disk, an unwritable directory) raises OSError naming `path`;
    `path` itself is never left half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        try:
            write(tmp)
        except SafetensorError as err:  # safetensors reports I/O failures as its own type
            raise OSError(f'could not write {path}: {err}') from err
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(meta: Mapping[str, Any]) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return write


def save_checkpoint(path: PathLike, module: nn.Module, meta: Mapping[str, Any]) -> None:
    """Save `module`'s state dict to `path` (.safetensors) and `meta` to its JSON sidecar."""
    save_tensors(path, module.state_dict(), meta)


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any]) -> None:
    """Save named tensors to `path` (.safetensors) and `meta` to its JSON sidecar."""
    path = Path(path)
    if path.suffix != '.safetensors':
        raise ValueError(f'checkpoint path must end in .safetensors, got {path}')
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt'}))
    _atomic_write(sidecar_path(path), _write_json({**meta, 'torch_version': torch.__version__}))


def read_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors on CPU, sidecar dict) of a checkpoint; FileNotFoundError names the missing file."""
    path = Path(path)
    for p in (path, sidecar_path(path)):
        if not p.is_file():
            raise FileNotFoundError(f'checkpoint file not found: {p}')
    with open(sidecar_path(path)) as f:
        meta = json.load(f)
    return load_file(path, device='cpu'), meta


def load_tensors_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `module` in place; ValueError names the first mismatched tensor."""
    expected = module.state_dict()
    for name, value in expected.items():
        if name not in tensors:
            raise ValueError(f'{source}: tensor {name!r} is missing from the checkpoint')
        if tensors[name].shape != value.shape:
            raise ValueError(f'{source}: tensor {name!r} has shape {tuple(tensors[name].shape)} '
                             f'in the checkpoint but {tuple(value.shape)} in the model')
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise ValueError(f'{source}: unexpected tensor {unexpected[0]!r} in the checkpoint')
    # load_state_dict copies in place (.copy_), so optimisers holding the parameters stay valid.
    module.load_state_dict(dict(tensors))
