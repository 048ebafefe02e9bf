"""Real WidowX 250: camera + widowx + policy (+ learner when fine-tuning) + recorder.

The Interbotix driver (interbotix_xs_sdk) is launched separately, as its own package documents.
The episode manager runs in its own terminal (it reads the keyboard); its reset routine is the
widowx node's homing service:

    ros2 run robot_rl episode_manager --ros-args \
        --params-file <share>/configs/ros/episode_manager.yaml \
        -p reset_service:=home -p instruction:="put the spoon on the towel"

    ros2 launch robot_rl widowx.launch.py robot_model:=wx250s camera_device:=0 \
        policy:=tiny_mlp critic_checkpoint:=/path/critic.safetensors finetune:=false \
        spacemouse:=true spacemouse_device:=/dev/hidraw0    # optional SpaceMouse takeover
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
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument('robot_model', default_value='wx250s',
                              description='Interbotix robot name (topic namespace).'),
        DeclareLaunchArgument('camera_device', default_value='0',
                              description='OpenCV camera index or path.'),
        DeclareLaunchArgument('policy', default_value='tiny_mlp',
                              description='Registered policy name.'),
        DeclareLaunchArgument('critic_checkpoint', default_value='',
                              description='Critic checkpoint for steering (empty = none).'),
        DeclareLaunchArgument('finetune', default_value='false',
                              description='Run the learner node on this machine.'),
        DeclareLaunchArgument('spacemouse', default_value='false',
                              description='Run the SpaceMouse teleop node (takeover device).'),
        DeclareLaunchArgument('spacemouse_device', default_value='/dev/hidraw0',
                              description='hidraw device of the SpaceMouse.'),
        Node(package='robot_rl', executable='camera', name='camera',
             parameters=[params('camera.yaml'), {'device': arg('camera_device')}]),
        Node(package='robot_rl', executable='widowx', name='widowx',
             parameters=[params('widowx.yaml'), {'robot_model': arg('robot_model')}]),
        Node(package='robot_rl', executable='policy', name='policy',
             parameters=[params('policy.yaml'),
                         {'config_name': '', 'policy.name': arg('policy'),
                          'steering.critic_checkpoint': arg('critic_checkpoint')}]),
        Node(package='robot_rl', executable='learner', name='learner',
             parameters=[params('learner.yaml'), {'config_name': '',
                                                  'policy.name': arg('policy')}],
             condition=IfCondition(arg('finetune'))),
        Node(package='robot_rl', executable='recorder', name='recorder',
             parameters=[params('recorder.yaml')]),
        Node(package='robot_rl', executable='spacemouse', name='spacemouse',
             parameters=[params('spacemouse.yaml'),
                         {'device_path': arg('spacemouse_device')}],
             condition=IfCondition(arg('spacemouse'))),
    ])
