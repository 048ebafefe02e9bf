"""Rollout videos and labelled frames: what people would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import cv2
import numpy as np


def caption(frame: np.ndarray, lines: Sequence[str], size: int,
            colour=(255, 255, 255)) -> np.ndarray:
    """Upscale a uint8 (H, W, 3) frame to (size, size, 3) and write `lines` in its top-left."""
    out = cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
    scale = size / 512.0
    line_height = int(26 * scale) + 4
    # A darkened band behind the text keeps it readable on any background.
    band = out[:line_height * len(lines) + 6]
    band[:] = (band * 0.45).astype(np.uint8)
    for i, text in enumerate(lines):
        origin = (int(8 * scale) + 2, line_height * (i + 1))
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, colour,
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return out


def write_video(path: Union[str, Path], frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write uint8 (H, W, 3) RGB frames as an H.264 MP4 (plays in browsers); returns the path."""
    import imageio.v2 as imageio  # ffmpeg is shipped inside the imageio-ffmpeg wheel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.tmp{path.suffix}')
    with imageio.get_writer(tmp, fps=fps, codec='libx264', quality=7, macro_block_size=16,
                            pixelformat='yuv420p', ffmpeg_log_level='error') as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    tmp.replace(path)
    return path
