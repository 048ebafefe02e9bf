#!/usr/bin/env bash
# Regenerate robot_rl/checkpoints/sim (the demo's generalist and critic) from scratch with the
# project's own pipeline: scripted-expert data -> behaviour cloning -> Cal-QL. About 1.2 hours
# on 2 CPU cores; the intermediate data and runs go to $1 (default outputs/checkpoints).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(realpath -m "${1:-$root/outputs/checkpoints}")
bin="$root/.venv/bin"
"$root/scripts/setup_env.sh" "$root/.venv"
data="$work/data/robot_rl_sim/1.0.0"
source="data.sources=[{path:$data,split:train,weight:1.0,labelling:dataset}]"

# 1. 300 mixed-quality expert episodes per task at 64 px (about 57% succeed).
"$bin/robot-rl-gen-data" expert=mixed image_size=64 episodes_per_task=300 \
    output_dir="$work/data"
# 2. The generalist: a diffusion policy cloned from the successful episodes, no augmentation.
"$bin/robot-rl-train-bc" policy=diffusion data=sim "$source" successes_only=true device=cpu \
    batch_size=64 steps=20000 augment.enabled=false output_dir="$work/runs" run_name=bc
# 3. The critic: Cal-QL (V-GPS settings), the tiny CPU critic reading the robot state beside the
#    image, on the same scripted data (successes and failures), no augmentation (random crops
#    move the scene against the state; README, "a critic trained without crops"). Seed 1:
#    critics from other seeds steer differently (README, "a critic that reads the robot's state").
"$bin/robot-rl-train-critic" data=sim "$source" critic=tiny critic.state_dim=7 seed=1 \
    device=cpu batch_size=64 steps=4000 augment.enabled=false output_dir="$work/runs" \
    run_name=critic

out="$root/robot_rl/checkpoints/sim"
mkdir -p "$out/critic"
cp "$work/runs/bc/checkpoints/last/policy."{safetensors,json} "$out/"
cp "$work/runs/critic/checkpoints/last/"{critic,target_critic}.{safetensors,json} "$out/critic/"
echo "checkpoints written to $out"
