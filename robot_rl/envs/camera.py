"""Offscreen rendering of one fixed model camera into uint8 (S, S, 3) RGB frames.

The GL backend is chosen from MUJOCO_GL when the camera is created (egl unless set), not when
mujoco was imported, so importing mujoco before robot_rl.envs cannot leave us with GLFW on a
headless machine.
"""

from __future__ import annotations

import os

import mujoco
import numpy as np


def _gl_context(width: int, height: int):
    backend = os.environ.get('MUJOCO_GL', 'egl').lower()
    if backend == 'egl':
        from mujoco.egl import GLContext
    elif backend == 'osmesa':
        from mujoco.osmesa import GLContext
    else:
        from mujoco.glfw import GLContext
    return GLContext(width, height)


class OffscreenCamera:
    """Renders the named fixed camera of `model` at size x size pixels."""

    def __init__(self, model: mujoco.MjModel, camera: str, size: int):
        self._gl = _gl_context(size, size)
        self._gl.make_current()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=model.ngeom + 16)
        self._option = mujoco.MjvOption()
        self._perturb = mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = model.camera(camera).id
        self._rect = mujoco.MjrRect(0, 0, size, size)
        self._pixels = np.empty((size, size, 3), dtype=np.uint8)

    def render(self, model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
        """A new uint8 (S, S, 3) frame of `data` (positions must be current: mj_forward)."""
        self._gl.make_current()  # several envs may share the process, each with its context
        mujoco.mjv_updateScene(model, data, self._option, self._perturb, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._pixels, None, self._rect, self._context)
        return np.flipud(self._pixels).copy()  # OpenGL rows run bottom-up

    def gl_renderer(self) -> str:
        """The OpenGL renderer string, e.g. 'llvmpipe (LLVM 15.0.6, 256 bits)'."""
        from OpenGL import GL  # PyOpenGL comes with mujoco's egl/osmesa backends
        self._gl.make_current()
        return GL.glGetString(GL.GL_RENDERER).decode()

    def close(self) -> None:
        if self._gl is not None:
            self._gl.make_current()
            self._context.free()
            self._gl.free()
            self._gl = None
