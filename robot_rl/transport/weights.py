"""Policy weights on the wire, with versions: learner -> actor, keep-latest.

Schema 'robot_rl.weights/1': the arrays are a state dict (name -> float16/float32/float64/int
array, every float finite); meta: policy (registered name), kwargs (its constructor arguments,
so the receiver can check it holds the same architecture), anything else JSON. The envelope
number is the weight version, which rises by one per published update; receivers keep the
newest and drop older or repeated versions (`VersionGate`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import numpy as np

from robot_rl.transport.envelope import decode, encode, EnvelopeError, register_schema

WEIGHTS_SCHEMA = 'robot_rl.weights/1'
_ALLOWED_KINDS = {'f', 'i', 'u', 'b'}


@dataclasses.dataclass(frozen=True)
class WeightUpdate:
    version: int
    tensors: Dict[str, np.ndarray]
    meta: Dict[str, Any]


def encode_weights(tensors: Mapping[str, np.ndarray], version: int,
                   meta: Optional[Mapping[str, Any]] = None) -> bytes:
    """Envelope bytes for a state dict given as numpy arrays (see `state_dict_to_numpy`)."""
    if version < 0:
        raise ValueError(f'weight version must be >= 0, got {version}')
    return encode(WEIGHTS_SCHEMA, version, tensors, meta)


def decode_weights(data: bytes) -> WeightUpdate:
    """Verify and decode; EnvelopeError says why a message fails verification."""
    env = decode(data, WEIGHTS_SCHEMA)
    if env.number < 0:
        raise EnvelopeError(f'weight version must be >= 0, got {env.number}')
    return WeightUpdate(version=env.number, tensors=env.arrays, meta=env.meta)


WIRE_DTYPES = ('float32', 'float16')


def state_dict_to_numpy(state_dict: Mapping[str, Any],
                        float_dtype: str = 'float32') -> Dict[str, np.ndarray]:
    """torch state dict -> {name: contiguous numpy array on the CPU} (no torch import here).

    float_dtype 'float16' halves a weight message (floating tensors only; the receiver copies
    them into its float32 modules). Values beyond float16's range are an error, not inf.
    """
    if float_dtype not in WIRE_DTYPES:
        raise ValueError(f'float_dtype must be one of {WIRE_DTYPES}, got {float_dtype!r}')
    out = {}
    for name, value in state_dict.items():
        array = value.detach().cpu().numpy()
        if array.dtype.kind == 'f' and array.dtype != np.dtype(float_dtype):
            if float_dtype == 'float16' and array.size and np.abs(array).max() > 65504:
                raise ValueError(f'tensor {name!r} exceeds the float16 range')
            array = array.astype(float_dtype)
        out[name] = np.ascontiguousarray(array)
    return out


@register_schema(WEIGHTS_SCHEMA)
def _check_weights(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    if not arrays:
        raise EnvelopeError('a weights envelope needs at least one tensor')
    if not isinstance(meta.get('policy'), str) or not isinstance(meta.get('kwargs', {}), dict):
        raise EnvelopeError('meta.policy must be a string and meta.kwargs an object')
    for name, arr in arrays.items():
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise EnvelopeError(f'tensor {name!r} has unsupported dtype {arr.dtype}')
        if arr.dtype.kind == 'f' and not np.isfinite(arr).all():
            raise EnvelopeError(f'tensor {name!r} has non-finite values')


class VersionGate:
    """Keep-latest: `accept(v)` is True only for a version newer than every accepted one."""

    def __init__(self, current: int = -1):
        self.current = current

    def accept(self, version: int) -> bool:
        if version <= self.current:
            return False
        self.current = version
        return True
