"""Simulation all-in-one: sim + policy + learner + recorder (no hardware).

    ros2 launch robot_rl sim.launch.py task:=stack_blocks finetune:=true
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
    return LaunchDescription([
        DeclareLaunchArgument('task', default_value='spoon_on_towel',
                              description='Simulated task (robot_rl.envs.TASKS).'),
        DeclareLaunchArgument('finetune', default_value='true',
                              description='Run the learner node (online fine-tuning).'),
        DeclareLaunchArgument('record', default_value='true',
                              description='Run the recorder node.'),
        Node(package='robot_rl', executable='sim', name='sim',
             parameters=[params('sim.yaml'), {'task': task}]),
        Node(package='robot_rl', executable='policy', name='policy',
             parameters=[params('policy.yaml')]),
        Node(package='robot_rl', executable='learner', name='learner',
             parameters=[params('learner.yaml')], condition=IfCondition(finetune)),
        Node(package='robot_rl', executable='recorder', name='recorder',
             parameters=[params('recorder.yaml')],
             condition=IfCondition(LaunchConfiguration('record'))),
    ])
