"""Actor <-> learner wire format: envelopes, step batches, weights, events (no ROS inside)."""

from robot_rl.transport.envelope import decode, encode, Envelope, EnvelopeError
from robot_rl.transport.events import ActorTracker, parse_event, StepEvent
from robot_rl.transport.steps import (decode_steps, encode_steps, EpisodeAssembler, StepBatch,
                                      StepRecord)
from robot_rl.transport.weights import (decode_weights, encode_weights, state_dict_to_numpy,
                                        VersionGate, WeightUpdate)

__all__ = ['ActorTracker', 'Envelope', 'EnvelopeError', 'EpisodeAssembler', 'StepBatch',
           'StepEvent', 'StepRecord', 'VersionGate', 'WeightUpdate', 'decode', 'decode_steps',
           'decode_weights', 'encode', 'encode_steps', 'encode_weights', 'parse_event',
           'state_dict_to_numpy']
