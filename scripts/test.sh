#!/usr/bin/env bash
# The whole test suite: set up .venv-test (runtime + test-only packages), then run pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup_env.sh" "$root/.venv-test" "$root/requirements-test.txt"
export MUJOCO_GL=${MUJOCO_GL:-egl}
cd "$root"
exec "$root/.venv-test/bin/python" -m pytest "$@"
