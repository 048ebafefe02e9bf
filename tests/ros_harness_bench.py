"""Drivers of benchmarks/bench_ros.py (kept beside the test harness: rclpy is imported only in
robot_rl/nodes/ and tests/). ROS 2 benchmarks on loopback (rclpy from the ros-jazzy wheels,
Fast DDS):

1. camera-to-action latency (p50/p99) through the policy node, steering K = 10, CPU;
2. time to deliver a ~25M-parameter weight update to the policy node (publish -> in use);
3. transitions per second the learner node ingests.

    .venv-test/bin/python benchmarks/bench_ros.py [--frames 100]
"""

import argparse
import json
import os
from pathlib import Path
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ros_harness import loopback_env, NodeProcess, spin_until, unique_domain_id  # noqa: E402

BIG = {'hidden': 4600, 'layers': 2}


def machine():
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs'


class Driver:
    def __init__(self, domain):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        rclpy.init(domain_id=domain)
        self.node = rclpy.create_node('bench_driver')
        self.ex = SingleThreadedExecutor()
        self.ex.add_node(self.node)

    def spin(self, pred, timeout, what, procs=()):
        spin_until(self.ex, pred, timeout, what, procs)


SHIPPED = Path(__file__).resolve().parents[1] / 'robot_rl' / 'checkpoints' / 'sim'
STEERED = {'policy.checkpoint': str(SHIPPED / 'policy.safetensors'),
           'steering.critic_checkpoint': str(SHIPPED / 'critic')}
"""The shipped diffusion generalist steered by the shipped Cal-QL critic (V-GPS)."""


def bench_latency(d, tmp, env, frames, rate_hz=5.0, steered=False):
    """Frames are published in lock-step (next frame after the previous action), so at 5 Hz
    each frame waits for the next control tick: latency = tick phase + inference + transport.
    At 50 Hz the tick wait is at most 20 ms and the figure is close to the pipeline cost.
    `steered`: the shipped diffusion policy samples K = 10 chunks and the shipped critic scores
    them (V-GPS); otherwise the tiny MLP samples K = 10 and one is taken."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32MultiArray, String
    from std_msgs.msg import Header

    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.ros_common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
    params = {'steering.num_samples': 10, 'transitions.enabled': False,
              'control_rate_hz': rate_hz, **(STEERED if steered else {})}
    policy = NodeProcess('policy', params, tmp, env,
                         name=f'policy_latency_{rate_hz:g}hz{"_vgps" if steered else ""}')
    if not hasattr(d, 'pub_img'):
        d.pub_img = d.node.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
        d.pub_evt = d.node.create_publisher(String, 'events', COMMAND_QOS)
        d.pub_ins = d.node.create_publisher(String, 'instruction', LATCHED_QOS)
        d.pub_ins.publish(String(data='stack'))
        d.got = []
        d.node.create_subscription(Float32MultiArray, 'action',
                                   lambda m: d.got.append(time.perf_counter()), COMMAND_QOS)
    pub_img, pub_evt, got = d.pub_img, d.pub_evt, d.got
    d.spin(lambda: pub_img.get_subscription_count() > 0, 90, 'policy start', [policy])
    rgb = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    latencies, lost = [], 0
    for i in range(frames + 5):
        now = d.node.get_clock().now()
        event = {'type': 'step', 'episode': 0, 'step': i, 'stamp_ns': now.nanoseconds,
                 'state': [0.25, 0, 0.16, 0, 0, 0, 1], 'reward': None, 'terminated': False,
                 'truncated': False, 'success': False, 'instruction': 'stack'}
        pub_evt.publish(String(data=json.dumps(event)))
        n = len(got)
        sent = time.perf_counter()
        pub_img.publish(conv.rgb_to_image(Image, Header(stamp=now.to_msg()), rgb))
        try:
            d.spin(lambda: len(got) > n, 2, 'an action', [policy])
        except AssertionError:
            lost += 1  # a best-effort frame lost (start-up); counted and reported
            continue
        if i >= 5:
            latencies.append(got[-1] - sent)
    policy.stop()
    ms = np.array(latencies) * 1e3
    return {'frames': len(ms), 'frames_without_action': lost, 'steered': steered,
            'p50_ms': float(np.percentile(ms, 50)),
            'p99_ms': float(np.percentile(ms, 99)), 'control_rate_hz': rate_hz}


def bench_weights(d, tmp, env, repeats=3, dtype='float32'):
    from std_msgs.msg import Int64, UInt8MultiArray

    from policies.scripted import make_policy
    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.ros_common import LATCHED_QOS
    from robot_rl.transport import encode_weights, state_dict_to_numpy
    policy = NodeProcess('policy', {'config_name': '', 'policy.kwargs_json': json.dumps(BIG),
                                    'transitions.enabled': False}, tmp, env,
                         name=f'policy_weights_{dtype}')
    source = make_policy('tiny_mlp', BIG)
    params = sum(p.numel() for p in source.module.parameters())
    tensors = state_dict_to_numpy(source.module.state_dict(), dtype)
    pub = d.node.create_publisher(UInt8MultiArray, 'weights', LATCHED_QOS)
    versions = []
    d.node.create_subscription(Int64, 'policy/version', lambda m: versions.append(m.data),
                               LATCHED_QOS)
    d.spin(lambda: pub.get_subscription_count() > 0 and versions, 90, 'policy start', [policy])
    times = []
    for v in range(1, repeats + 1):
        start = time.perf_counter()
        blob = encode_weights(tensors, v, {'policy': 'tiny_mlp', 'kwargs': BIG})
        pub.publish(conv.bytes_to_uint8_multiarray(UInt8MultiArray, blob))
        d.spin(lambda: versions[-1] == v, 60, f'version {v} in use', [policy])
        times.append(time.perf_counter() - start)
    policy.stop()
    return {'parameters': params, 'dtype': dtype, 'megabytes': len(blob) / 2 ** 20,
            'seconds': [round(t, 3) for t in times], 'median_s': float(np.median(times))}


def bench_ingest(d, tmp, env, batches=300, steps=4):
    from std_msgs.msg import String, UInt8MultiArray

    from robot_rl.nodes import conversions as conv
    from robot_rl.nodes.ros_common import COMMAND_QOS, history_qos
    from robot_rl.transport import encode_steps, StepRecord
    learner = NodeProcess('learner', {'replay_dir': 'replay', 'checkpoint_dir': 'ckpt',
                                      'updates_per_tick': 0, 'update_rate_hz': 50.0,
                                      'device': 'cpu'}, tmp, env, name='learner_ingest')
    pub = d.node.create_publisher(UInt8MultiArray, 'transitions', history_qos(batches))
    status = []
    d.node.create_subscription(String, 'learner/status',
                               lambda m: status.append(json.loads(m.data)), COMMAND_QOS)
    d.spin(lambda: pub.get_subscription_count() > 0 and status, 90, 'learner start', [learner])
    rng = np.random.default_rng(0)
    msgs = []
    for b in range(batches):
        recs = [StepRecord(step=i, image=rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
                           state=np.zeros(7, np.float32), action=np.zeros(7, np.float32),
                           reward=-1.0, is_first=i == 0, is_last=i == steps - 1,
                           is_terminal=False) for i in range(steps)]
        msgs.append(conv.bytes_to_uint8_multiarray(UInt8MultiArray, encode_steps(
            recs, actor='bench', episode=b, instruction='stack', seq=b)))
    start = time.perf_counter()
    for m in msgs:
        pub.publish(m)
    total = batches * steps
    d.spin(lambda: status[-1]['steps_received'] >= total, 300, 'ingest', [learner])
    seconds = time.perf_counter() - start  # includes up to 1 s of status-period slack
    learner.stop()
    return {'steps': total, 'episodes': batches, 'seconds': round(seconds, 2),
            'steps_per_s': total / seconds, 'transitions_per_s': batches * (steps - 1) / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=100, help='frames per latency run')
    parser.add_argument('--parts', nargs='+', default=['latency', 'weights', 'ingest'],
                        choices=['latency', 'steered', 'weights', 'ingest'],
                        help='latency: tiny MLP, K = 10 sampled; steered: the shipped '
                             'diffusion policy + Cal-QL critic, V-GPS at K = 10')
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    domain = unique_domain_id()
    env = loopback_env(domain)
    os.environ.update({k: env[k] for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')})
    d = Driver(domain)
    results = {'machine': machine(), 'rmw': 'rmw_fastrtps_cpp (ros-jazzy wheels), loopback'}
    if 'latency' in args.parts:
        results['latency_k10_50hz'] = bench_latency(d, tmp, env, args.frames, 50.0)
        print(json.dumps(results['latency_k10_50hz']), flush=True)
        results['latency_k10_5hz'] = bench_latency(d, tmp, env, args.frames, 5.0)
        print(json.dumps(results['latency_k10_5hz']), flush=True)
    if 'steered' in args.parts:
        for rate in (50.0, 5.0):
            key = f'latency_vgps_k10_{rate:g}hz'
            results[key] = bench_latency(d, tmp, env, args.frames, rate, steered=True)
            print(json.dumps(results[key]), flush=True)
    if 'weights' in args.parts:
        for dtype in ('float32', 'float16'):
            results[f'weights_25m_{dtype}'] = bench_weights(d, tmp, env, dtype=dtype)
            print(json.dumps(results[f'weights_25m_{dtype}']), flush=True)
    if 'ingest' in args.parts:
        results['learner_ingest'] = bench_ingest(d, tmp, env)
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
