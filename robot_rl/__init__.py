"""robot_rl: V-GPS steering and PA-RL fine-tuning for generalist robot policies."""
