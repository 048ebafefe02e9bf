#!/usr/bin/env bash
# The main job: set up .venv, then run robot-rl-demo (extra arguments are hydra overrides).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup_env.sh" "$root/.venv"
export MUJOCO_GL=${MUJOCO_GL:-egl}
cd "$root"
exec "$root/.venv/bin/robot-rl-demo" "$@"
