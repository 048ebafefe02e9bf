#!/usr/bin/env bash
# Regenerate robot_rl/checkpoints/sim (the demo's generalist and critic) from scratch with the
# project's own pipeline: scripted-expert data -> behaviour cloning -> the generalist's own
# attempts -> Cal-QL. About 1.7 hours on 2 CPU cores; the intermediate data and runs go to $1 (default outputs/checkpoints).
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
# 3. The generalist's own attempts (K = 1, the evaluation's execution), labelled by the
#    simulator, on layouts of their own (seeds 1000+ and 2000+): what the critic must rank.
policy="$work/runs/bc/checkpoints/last/policy.safetensors"
"$bin/robot-rl-gen-data" policy_path="$policy" image_size=64 episodes_per_task=150 seed=1000 \
    name=attempts_a output_dir="$work/data"
"$bin/robot-rl-gen-data" policy_path="$policy" image_size=64 episodes_per_task=250 seed=2000 \
    name=attempts_b output_dir="$work/data"
# 4. The critic: Cal-QL (V-GPS settings), the tiny CPU critic, half of every batch from the
#    scripted data and half from the attempts.
attempts="{path:$work/data/attempts_a/1.0.0,weight:0.2},{path:$work/data/attempts_b/1.0.0,weight:0.3}"
"$bin/robot-rl-train-critic" data=sim "data.sources=[{path:$data,weight:0.5},$attempts]" \
    critic=tiny device=cpu batch_size=64 steps=4000 output_dir="$work/runs" run_name=critic

out="$root/robot_rl/checkpoints/sim"
mkdir -p "$out/critic"
cp "$work/runs/bc/checkpoints/last/policy."{safetensors,json} "$out/"
cp "$work/runs/critic/checkpoints/last/"{critic,target_critic}.{safetensors,json} "$out/critic/"
echo "checkpoints written to $out"
