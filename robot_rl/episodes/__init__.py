"""Episodes on a real robot: the episode state machine, human labels, the action arbiter
(e-stop > teleoperation > hold > policy), keyboard teleoperation and intervention replay.
No ROS inside; robot_rl/nodes/episode_manager_node.py wires it to topics."""
