"""Learner only, for a separate GPU machine on the robot's ROS domain.

    ros2 launch robot_rl learner.launch.py device:=cuda
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def params(name):
    return os.path.join(get_package_share_directory('robot_rl'), 'configs', 'ros', name)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('device', default_value='auto',
                              description='Torch device: auto, cpu or cuda.'),
        Node(package='robot_rl', executable='learner', name='learner',
             parameters=[params('learner.yaml'), {'device': LaunchConfiguration('device')}]),
    ])
