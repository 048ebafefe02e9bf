"""V-GPS value-guided steering of any Policy, and how chosen chunks become actions."""

from robot_rl.steering.execution import ChunkExecutor, StickyGripper, TemporalEnsembler
from robot_rl.steering.vgps import load_steering_critics, StepInfo, ValueGuidedSteering

__all__ = ['ChunkExecutor', 'load_steering_critics', 'StepInfo', 'StickyGripper',
           'TemporalEnsembler', 'ValueGuidedSteering']
