"""Message <-> numpy conversions as pure functions (no rclpy import).

They work on any object with the ROS field names (rclpy messages, or the `rosbags` classes of
Humble and Jazzy the T0 tests use), and build messages through the class passed in.
Every reader validates and raises ValueError with the reason; nodes log it and drop the message.
"""

from __future__ import annotations

import array
from typing import Any, Sequence, Tuple

import cv2
import numpy as np

from robot_rl.types import ActionSpace

SUPPORTED_ENCODINGS = {'rgb8': (3, False), 'bgr8': (3, True), 'rgba8': (4, False),
                       'bgra8': (4, True), 'mono8': (1, False)}
"""encoding -> (channels, is BGR order); all uint8."""


def stamp_to_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp_fields(ns: int) -> Tuple[int, int]:
    return int(ns // 1_000_000_000), int(ns % 1_000_000_000)


def _bytes(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(np.uint8, copy=False).reshape(-1)
    return np.frombuffer(memoryview(data).cast('B'), np.uint8)


def check_image(msg: Any) -> None:
    """Cheap validation of a sensor_msgs/Image (no pixel copy); ValueError with the reason."""
    image_to_rgb(msg, decode=False)


def image_to_rgb(msg: Any, decode: bool = True) -> np.ndarray:
    """sensor_msgs/Image -> uint8 (H, W, 3) RGB (a copy). ValueError for an unsupported
    encoding, a step/size mismatch or empty data."""
    if msg.encoding not in SUPPORTED_ENCODINGS:
        raise ValueError(f'unsupported image encoding {msg.encoding!r}; supported: '
                         f'{sorted(SUPPORTED_ENCODINGS)}')
    channels, bgr = SUPPORTED_ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = _bytes(msg.data)
    if h <= 0 or w <= 0 or data.size == 0:
        raise ValueError(f'empty image ({w}x{h}, {data.size} bytes)')
    if step < w * channels or data.size != step * h:
        raise ValueError(f'image data has {data.size} bytes, expected height x step = {h} x '
                         f'{step} with step >= width x channels = {w * channels}')
    if not decode:
        return data
    pixels = data.reshape(h, step)[:, :w * channels].reshape(h, w, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    rgb = pixels[..., :3][..., ::-1] if bgr else pixels[..., :3]
    return np.ascontiguousarray(rgb)


def rgb_to_image(image_cls: Any, header: Any, rgb: np.ndarray, as_numpy: bool = False) -> Any:
    """uint8 (H, W, 3) RGB -> image_cls (sensor_msgs/Image, rgb8). rclpy wants array.array
    data (a fast copy); rosbags classes want numpy (as_numpy=True)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected (H, W, 3) RGB, got {rgb.shape}')
    h, w, _ = rgb.shape
    data = rgb.reshape(-1) if as_numpy else array.array('B', rgb.tobytes())
    return image_cls(header=header, height=h, width=w, encoding='rgb8', is_bigendian=0,
                     step=w * 3, data=data)


def rgb_to_compressed(compressed_cls: Any, header: Any, rgb: np.ndarray, quality: int = 90,
                      as_numpy: bool = False) -> Any:
    """uint8 (H, W, 3) RGB -> sensor_msgs/CompressedImage with format 'rgb8; jpeg compressed
    bgr8' (the image_transport convention)."""
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError('JPEG encoding failed')
    data = buf.reshape(-1) if as_numpy else array.array('B', buf.tobytes())
    return compressed_cls(header=header, format='rgb8; jpeg compressed bgr8', data=data)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> uint8 (H, W, 3) RGB; ValueError if undecodable."""
    data = _bytes(msg.data)
    if data.size == 0:
        raise ValueError('empty compressed image')
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f'compressed image ({msg.format!r}) does not decode')
    return np.ascontiguousarray(bgr[..., ::-1])


def action_from_floats(data: Sequence[float], space: ActionSpace) -> np.ndarray:
    """std_msgs/Float32MultiArray.data -> a checked, clipped float32 (7,) action.
    ValueError for a wrong length or non-finite values (ActionSpace.check)."""
    return space.check(np.asarray(data, dtype=np.float32).reshape(-1))


def floats_to_multiarray(cls: Any, values: np.ndarray, as_numpy: bool = False) -> Any:
    """float32 (N,) -> std_msgs/Float32MultiArray (empty layout)."""
    values = np.asarray(values, np.float32).reshape(-1)
    if as_numpy:
        return cls(layout=None, data=values)
    msg = cls()
    msg.data = array.array('f', values.tobytes())
    return msg


def bytes_to_uint8_multiarray(cls: Any, payload: bytes) -> Any:
    """Envelope bytes -> std_msgs/UInt8MultiArray (rclpy; one memcpy, no per-byte loop)."""
    msg = cls()
    msg.data = array.array('B', payload)
    return msg


def uint8_multiarray_bytes(msg: Any) -> bytes:
    return _bytes(msg.data).tobytes()


def check_instruction(text: str) -> str:
    """A non-empty instruction, stripped; ValueError otherwise."""
    text = (text or '').strip()
    if not text:
        raise ValueError('empty instruction')
    return text
