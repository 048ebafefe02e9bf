"""T2 driver: the policy node (rclpy on Fast DDS) driven from Cyclone DDS's Python binding.

Run inside a private network namespace with only loopback (tests/test_nodes_dds.py does
`unshare -rn`), so default multicast discovery stays inside it. Prints one JSON line:
{"actions": [[7 floats], ...], "policy_alive": bool, "log": str}.
ROS 2 topic `x` is DDS topic `rt/x`; type `pkg/msg/T` is `pkg::msg::dds_::T_`.
"""

from dataclasses import dataclass
import json
import os
from pathlib import Path
import sys
import tempfile
import time

from cyclonedds.core import Policy, Qos
from cyclonedds.domain import DomainParticipant
from cyclonedds.idl import IdlStruct
from cyclonedds.idl.types import float32, int32, sequence, uint32, uint8
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ros_harness import NodeProcess  # noqa: E402


@dataclass
class Time(IdlStruct, typename='builtin_interfaces::msg::dds_::Time_'):
    sec: int32
    nanosec: uint32


@dataclass
class Header(IdlStruct, typename='std_msgs::msg::dds_::Header_'):
    stamp: Time
    frame_id: str


@dataclass
class Image(IdlStruct, typename='sensor_msgs::msg::dds_::Image_'):
    header: Header
    height: uint32
    width: uint32
    encoding: str
    is_bigendian: uint8
    step: uint32
    data: sequence[uint8]


@dataclass
class String(IdlStruct, typename='std_msgs::msg::dds_::String_'):
    data: str


@dataclass
class MultiArrayDimension(IdlStruct, typename='std_msgs::msg::dds_::MultiArrayDimension_'):
    label: str
    size: uint32
    stride: uint32


@dataclass
class MultiArrayLayout(IdlStruct, typename='std_msgs::msg::dds_::MultiArrayLayout_'):
    dim: sequence[MultiArrayDimension]
    data_offset: uint32


@dataclass
class Float32MultiArray(IdlStruct, typename='std_msgs::msg::dds_::Float32MultiArray_'):
    layout: MultiArrayLayout
    data: sequence[float32]


RELIABLE = Policy.Reliability.Reliable(duration(seconds=1))
LATCHED = Qos(RELIABLE, Policy.Durability.TransientLocal, Policy.History.KeepLast(1))
COMMAND = Qos(RELIABLE, Policy.Durability.Volatile, Policy.History.KeepLast(10))
SENSOR = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(5))


def event_json(step, stamp_ns):
    return json.dumps({'type': 'step', 'episode': 0, 'step': step, 'stamp_ns': stamp_ns,
                       'state': [0.25, 0, 0.16, 0, 0, 0, 1], 'reward': None if step == 0
                       else -1.0, 'terminated': False, 'truncated': False, 'success': False,
                       'instruction': 'stack'})


def main(seconds: float = 25.0):
    tmp = Path(tempfile.mkdtemp())
    env = dict(os.environ, ROS_DOMAIN_ID='0', PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('ROS_AUTOMATIC_DISCOVERY_RANGE', None)
    node = NodeProcess('policy', {'transitions.enabled': False}, tmp, env)
    dp = DomainParticipant(0)
    w_image = DataWriter(dp, Topic(dp, 'rt/camera/image_raw', Image), SENSOR)
    w_event = DataWriter(dp, Topic(dp, 'rt/events', String), COMMAND)
    w_instr = DataWriter(dp, Topic(dp, 'rt/instruction', String), LATCHED)
    r_action = DataReader(dp, Topic(dp, 'rt/action', Float32MultiArray), COMMAND)
    w_instr.write(String(data='stack the green block'))
    rng = np.random.default_rng(0)
    actions, step, deadline = [], 0, time.monotonic() + seconds
    while time.monotonic() < deadline and (len(actions) < 8 or step < 6) and node.alive():
        stamp = time.time_ns()
        w_event.write(String(data=event_json(step, stamp)))
        data = rng.integers(0, 255, 64 * 64 * 3, dtype=np.uint8).tolist()
        hdr = Header(stamp=Time(sec=stamp // 10 ** 9, nanosec=stamp % 10 ** 9), frame_id='c')
        w_image.write(Image(header=hdr, height=64, width=64, encoding='rgb8', is_bigendian=0,
                            step=64 * 3, data=data))
        time.sleep(0.2)
        for sample in r_action.take(N=20):
            actions.append([float(x) for x in sample.data])
        step += 1
    alive = node.alive()
    node.stop()
    print(json.dumps({'actions': actions, 'policy_alive': alive, 'steps': step,
                      'log': node.log()[-4000:], 'log_path': str(node.log_path)}))


if __name__ == '__main__':
    main()
