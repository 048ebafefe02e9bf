"""V-GPS value-guided steering of any Policy, and how chosen chunks become actions."""

from robot_rl.steering.execution import ChunkExecutor, StickyGripper, TemporalEnsembler
from robot_rl.steering.vgps import StepInfo, ValueGuidedSteering

__all__ = ['ChunkExecutor', 'StepInfo', 'StickyGripper', 'TemporalEnsembler',
           'ValueGuidedSteering']
