#!/usr/bin/env bash
# Create (or refresh) a virtual environment with robot_rl and its pinned dependencies.
# Usage: scripts/setup_env.sh VENV_DIR [REQUIREMENTS_FILE ...]
# Idempotent: pip runs only when the requirement files changed since the last successful setup.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:?usage: setup_env.sh VENV_DIR [REQUIREMENTS_FILE ...]}
shift
reqs=("$root/requirements.txt" "$@")

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "robot_rl needs Python 3.11 or newer; $python is $("$python" --version 2>&1)." >&2
  echo "Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi

# Offscreen MuJoCo rendering uses EGL; without a GPU, Mesa renders in software.
system_packages=(libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libgles2)
if command -v dpkg >/dev/null; then
  missing=()
  for p in "${system_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "Installing system libraries for offscreen rendering: ${missing[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
else
  echo "dpkg not found: make sure EGL/Mesa libraries (${system_packages[*]}) are installed." >&2
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.robot_rl-setup"
digest=$(cat "$root/constraints.txt" "${reqs[@]}" "$root/setup.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "Installing pinned dependencies into $venv (first time: a few minutes) ..."
  req_args=()
  for r in "${reqs[@]}"; do req_args+=(-r "$r"); done
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" "${req_args[@]}"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  echo "$digest" > "$stamp"
fi
