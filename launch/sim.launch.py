"""Simulation all-in-one: sim + policy + learner + recorder (no hardware).

    ros2 launch robot_rl sim.launch.py task:=stack_blocks finetune:=true
    ros2 launch robot_rl sim.launch.py task:=carrot_on_plate \
        policy_checkpoint:=/path/policy.safetensors critic_checkpoint:=/path/critic_run_dir

With a policy and a critic checkpoint the policy node steers with the critic and the learner
fine-tunes both with PA-RL; without them the online policy of configs/online.yaml is used.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def params(name):
    return os.path.join(get_package_share_directory('robot_rl'), 'configs', 'ros', name)


def generate_launch_description():
    task = LaunchConfiguration('task')
    finetune = LaunchConfiguration('finetune')
    policy_checkpoint = LaunchConfiguration('policy_checkpoint')
    critic_checkpoint = LaunchConfiguration('critic_checkpoint')
    return LaunchDescription([
        DeclareLaunchArgument('task', default_value='spoon_on_towel',
                              description='Simulated task (robot_rl.envs.TASKS).'),
        DeclareLaunchArgument('finetune', default_value='true',
                              description='Run the learner node (online fine-tuning).'),
        DeclareLaunchArgument('record', default_value='true',
                              description='Run the recorder node.'),
        DeclareLaunchArgument('policy_checkpoint', default_value='',
                              description='Pre-trained policy (robot-rl-train-bc); empty = '
                                          'the online policy of configs/online.yaml.'),
        DeclareLaunchArgument('critic_checkpoint', default_value='',
                              description='Cal-QL critic: V-GPS steering and PA-RL.'),
        Node(package='robot_rl', executable='sim', name='sim',
             parameters=[params('sim.yaml'), {'task': task}]),
        Node(package='robot_rl', executable='policy', name='policy',
             parameters=[params('policy.yaml'),
                         {'policy.checkpoint': policy_checkpoint,
                          'steering.critic_checkpoint': critic_checkpoint}]),
        Node(package='robot_rl', executable='learner', name='learner',
             parameters=[params('learner.yaml'),
                         {'finetune.policy_checkpoint': policy_checkpoint,
                          'finetune.critic_checkpoint': critic_checkpoint}],
             condition=IfCondition(finetune)),
        Node(package='robot_rl', executable='recorder', name='recorder',
             parameters=[params('recorder.yaml')],
             condition=IfCondition(LaunchConfiguration('record'))),
    ])
