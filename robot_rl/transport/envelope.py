"""Versioned, schema-checked, checksummed binary envelopes (no pickle, no ROS).

Layout of one envelope (little endian):

    b'RRLE' | u16 format version | u32 header length | header (UTF-8 JSON) | payload

The payload is a safetensors blob of named arrays. The header holds the schema name and its
version, a sequence/weight version number, the payload's sha256 and free JSON metadata. Decoding
checks, in order: magic, format version, lengths, JSON, schema, checksum, then the arrays against
the schema (names, dtypes, shapes). Anything wrong raises `EnvelopeError` naming the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy

MAGIC = b'RRLE'
FORMAT_VERSION = 1
_PREFIX = struct.Struct('<4sHI')
MAX_HEADER_BYTES = 1 << 20


class EnvelopeError(ValueError):
    """An envelope failed verification; the message says why."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A decoded envelope: schema name, number (sequence or weight version), arrays, metadata."""

    schema: str
    number: int
    arrays: Dict[str, np.ndarray]
    meta: Dict[str, Any]


SchemaCheck = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], None]
SCHEMAS: Dict[str, SchemaCheck] = {}
"""Schema name (with its version, e.g. 'robot_rl.steps/1') -> check raising EnvelopeError."""


def register_schema(name: str) -> Callable[[SchemaCheck], SchemaCheck]:
    def decorator(check: SchemaCheck) -> SchemaCheck:
        SCHEMAS[name] = check
        return check
    return decorator


def encode(schema: str, number: int, arrays: Mapping[str, np.ndarray],
           meta: Optional[Mapping[str, Any]] = None) -> bytes:
    """Serialise arrays + metadata under `schema` (checked before writing) into bytes."""
    if schema not in SCHEMAS:
        raise EnvelopeError(f'unknown schema {schema!r}; known: {sorted(SCHEMAS)}')
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = dict(meta or {})
    SCHEMAS[schema](arrays, meta)
    payload = safetensors.numpy.save(arrays) if arrays else b''
    header = json.dumps({'schema': schema, 'number': int(number), 'meta': meta,
                         'payload_bytes': len(payload),
                         'sha256': hashlib.sha256(payload).hexdigest()},
                        sort_keys=True, separators=(',', ':')).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + payload


def decode(data: bytes, expected_schema: Optional[str] = None) -> Envelope:
    """Verify and decode bytes from `encode`; raises EnvelopeError with the reason."""
    data = memoryview(data).cast('B') if not isinstance(data, (bytes, bytearray)) else data
    header = _read_header(data)
    schema = header.get('schema')
    if expected_schema is not None and schema != expected_schema:
        raise EnvelopeError(f'expected schema {expected_schema!r}, got {schema!r}')
    if schema not in SCHEMAS:
        raise EnvelopeError(f'unknown schema {schema!r}')
    start = _PREFIX.size + header['_header_bytes']
    payload = bytes(data[start:])
    if len(payload) != header.get('payload_bytes'):
        raise EnvelopeError(f'payload has {len(payload)} bytes, header says '
                            f'{header.get("payload_bytes")}')
    if hashlib.sha256(payload).hexdigest() != header.get('sha256'):
        raise EnvelopeError('payload sha256 does not match the header (corrupted or tampered)')
    try:
        arrays = safetensors.numpy.load(payload) if payload else {}
    except Exception as exc:  # safetensors raises its own error types
        raise EnvelopeError(f'payload is not a valid safetensors blob: {exc}') from exc
    meta = header.get('meta')
    number = header.get('number')
    if not isinstance(meta, dict) or not isinstance(number, int):
        raise EnvelopeError('header needs an integer "number" and an object "meta"')
    SCHEMAS[schema](arrays, meta)
    return Envelope(schema=schema, number=number, arrays=arrays, meta=meta)


def peek(data: bytes) -> Tuple[Optional[str], int]:
    """(schema, number) read from the header alone, payload unverified; (None, -1) if unreadable.

    For routing and for naming a rejected message; never a substitute for `decode`.
    """
    try:
        header = _read_header(data)
    except EnvelopeError:
        return None, -1
    number = header.get('number')
    return header.get('schema'), number if isinstance(number, int) else -1


def _read_header(data) -> Dict[str, Any]:
    if len(data) < _PREFIX.size:
        raise EnvelopeError(f'envelope too short ({len(data)} bytes)')
    magic, version, header_bytes = _PREFIX.unpack(bytes(data[:_PREFIX.size]))
    if magic != MAGIC:
        raise EnvelopeError(f'bad magic {magic!r} (not a robot_rl envelope)')
    if version != FORMAT_VERSION:
        raise EnvelopeError(f'envelope format version {version}, this reader knows '
                            f'{FORMAT_VERSION}')
    if header_bytes > MAX_HEADER_BYTES or _PREFIX.size + header_bytes > len(data):
        raise EnvelopeError(f'header length {header_bytes} exceeds the envelope')
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + header_bytes]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f'header is not valid JSON: {exc}') from exc
    if not isinstance(header, dict):
        raise EnvelopeError('header is not a JSON object')
    header['_header_bytes'] = header_bytes
    return header


def require(arrays: Mapping[str, np.ndarray], name: str, dtype, shape) -> np.ndarray:
    """The array `name` with `dtype` and `shape` (None = any size on that axis), else raise."""
    if name not in arrays:
        raise EnvelopeError(f'missing array {name!r}')
    arr = arrays[name]
    if arr.dtype != np.dtype(dtype):
        raise EnvelopeError(f'array {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}')
    if arr.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, arr.shape)):
        raise EnvelopeError(f'array {name!r} has shape {arr.shape}, expected {shape}')
    return arr
