"""robot_rl: value-guided steering and policy-agnostic RL fine-tuning for generalist robot policies."""
