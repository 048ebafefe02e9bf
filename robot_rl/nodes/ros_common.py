"""rclpy helpers shared by the nodes: parameter declaration, named QoS profiles, main idiom.

Targets the rclpy API common to Humble and Jazzy.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
import rclpy
from rclpy.executors import (ExternalShutdownException, MultiThreadedExecutor,
                             SingleThreadedExecutor)
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile,
                       ReliabilityPolicy)

from robot_rl.nodes.params import NODE_PARAMS, ParamSpec

SENSOR_QOS = qos_profile_sensor_data
"""Camera and joint states: best effort, keep last (a late frame is worthless)."""
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""Instruction, weights, e-stop: reliable, transient local, depth 1 (latest value latched)."""
COMMAND_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
"""Actions and episode events: reliable, volatile."""


def history_qos(depth: int) -> QoSProfile:
    """Transitions: reliable, transient local, deep history (a restarted learner catches up)."""
    return QoSProfile(depth=int(depth), history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    d = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    if spec.min is not None and isinstance(spec.default, bool) is False:
        if isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max),
                                            step=0)]
        elif isinstance(spec.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(spec.min),
                                                         to_value=float(spec.max), step=0.0)]
    return d


def declare_all(node: Node, name: str) -> Dict[str, Any]:
    """Declare every parameter of NODE_PARAMS[name] (with descriptors); return their values."""
    values = {}
    for spec in NODE_PARAMS[name]:
        values[spec.name] = node.declare_parameter(spec.name, spec.default,
                                                   _descriptor(spec)).value
    return values


def reject_changes(params) -> SetParametersResult:
    """on_set_parameters callback for nodes that read parameters once at start."""
    return SetParametersResult(successful=False,
                               reason='this node reads its parameters at start; restart it')


def policy_spec(values: Dict[str, Any]) -> tuple:
    """(policy name, kwargs) from policy.* parameters, overridden by the hydra config's
    `policy` section when config_name is set (hydra compose API; one source of truth)."""
    name, kwargs = values['policy.name'], json.loads(values['policy.kwargs_json'] or '{}')
    if values.get('config_name'):
        from omegaconf import OmegaConf

        from robot_rl.cli.config import compose
        overrides = [o for o in values.get('config_overrides', []) if o]
        cfg = OmegaConf.to_container(compose(values['config_name'], overrides), resolve=True)
        name = cfg.get('policy', {}).get('name', name)
        kwargs = {**kwargs, **cfg.get('policy', {}).get('kwargs', {})}
    return name, kwargs


def run(make_node: Callable[[], Node], args: Optional[list] = None, threads: int = 4) -> None:
    """Init, spin, and shut down in the Humble/Jazzy idiom.

    threads > 1: a MultiThreadedExecutor (inference off the sensor callbacks); threads == 1:
    everything on the main thread (the sim: its EGL context is bound to the creating thread).
    """
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        executor = (MultiThreadedExecutor(num_threads=threads) if threads > 1
                    else SingleThreadedExecutor())
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # SIGINT shuts the context down from rclpy's signal handler; an executor caught building
        # its wait set at that moment raises RCLError ("context is not valid"). That is a clean
        # stop, not a failure; anything raised while the context is still valid is re-raised.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
