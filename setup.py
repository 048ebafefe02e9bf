"""ament_python package `robot_rl`: installs with plain pip or builds with colcon."""

from glob import glob
import os

from setuptools import find_packages, setup

package_name = 'robot_rl'


def tree(directory):
    """data_files entries installing `directory` (recursively) under share/robot_rl/."""
    entries = []
    for root, _, files in os.walk(directory):
        paths = [os.path.join(root, f) for f in files if not f.endswith('.pyc')]
        if paths:
            entries.append((os.path.join('share', package_name, root), paths))
    return entries


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['robot_rl', 'robot_rl.*', 'policies', 'policies.*']),
    package_data={'robot_rl': ['envs/assets/*', 'checkpoints/*/*.*', 'checkpoints/*/*/*.*']},
    include_package_data=True,
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.py')),
    ] + tree('configs'),
    install_requires=['setuptools'],
    extras_require={'test': ['pytest']},
    zip_safe=False,
    maintainer='robot_rl maintainers',
    maintainer_email='maintainers@robot-rl.dev',
    description='V-GPS steering and PA-RL fine-tuning for generalist robot policies (ROS 2).',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'robot-rl-demo = robot_rl.cli.demo:main',
            'robot-rl-gen-data = robot_rl.cli.gen_data:main',
            'sim = robot_rl.nodes.sim_node:main',
            'policy = robot_rl.nodes.policy_node:main',
            'learner = robot_rl.nodes.learner_node:main',
            'recorder = robot_rl.nodes.recorder_node:main',
            'widowx = robot_rl.nodes.widowx_node:main',
            'camera = robot_rl.nodes.camera_node:main',
            'episode_manager = robot_rl.nodes.episode_manager_node:main',
            'spacemouse = robot_rl.nodes.spacemouse_node:main',
            'robot-rl-train-critic = robot_rl.cli.train_critic:main',
            'robot-rl-train-bc = robot_rl.cli.train_bc:main',
            'robot-rl-eval = robot_rl.cli.evaluate:main',
            'robot-rl-finetune = robot_rl.cli.finetune:main',
            'robot-rl-train-reward = robot_rl.cli.train_reward:main',
        ],
    },
)
