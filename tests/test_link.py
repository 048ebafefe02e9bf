"""The actor <-> learner TCP link (robot_rl/transport/link.py) on loopback sockets."""

import logging
import socket
import threading
import time

import numpy as np
import pytest

from robot_rl.transport.envelope import decode
from robot_rl.transport.link import (ACK_SCHEMA, ActorLink, encode_ack, frame, FrameReader,
                                     LearnerServer)
from robot_rl.transport.steps import encode_steps, StepRecord
from robot_rl.transport.weights import encode_weights

TIMEOUT = 20.0


def steps_message(seq: int, episode: int = 0) -> bytes:
    rng = np.random.default_rng(seq)
    records = [StepRecord(t, rng.integers(0, 255, (8, 8, 3), np.uint8),
                          np.zeros(7, np.float32), np.zeros(7, np.float32), -1.0, t == 0,
                          t == 2, False) for t in range(3)]
    return encode_steps(records, actor='a', episode=episode, instruction='pick', seq=seq,
                        image_format='png')


def corrupt(message: bytes) -> bytes:
    broken = bytearray(message)
    broken[-10] ^= 0xFF  # a payload byte: the header still parses, the checksum fails
    return bytes(broken)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.01)


def read_frames(sock: socket.socket, reader: FrameReader, count: int):
    frames = []
    sock.settimeout(TIMEOUT)
    while len(frames) < count:
        frames += list(reader.feed(sock.recv(1 << 16)))
    return frames


class ScriptedLearner:
    """A raw loopback server answering each frame from a script: 'nack' or 'ack'."""

    def __init__(self, answers):
        self.server = socket.create_server(('127.0.0.1', 0))
        self.port = self.server.getsockname()[1]
        self.answers, self.received = list(answers), []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.server.accept()
        reader = FrameReader()
        with conn:
            for answer in self.answers:
                (message,) = read_frames(conn, reader, 1)
                self.received.append(message)
                seq = decode(message).number if answer == 'ack' else 7
                conn.sendall(frame(encode_ack(seq, answer == 'ack', 'sha256 mismatch')))
            time.sleep(0.5)


def test_a_rejected_batch_is_resent_until_acknowledged():
    learner = ScriptedLearner(['nack', 'ack'])
    link = ActorLink('127.0.0.1', learner.port, retry_s=0.05)
    try:
        message = steps_message(7)
        link.send(7, message)
        wait_for(lambda: link.unacked == 0, 'the acknowledgement')
        assert learner.received == [message, message]  # the same bytes, sent twice
        assert link.rejected == 1 and link.abandoned == 0 and link.acked_through == 7
    finally:
        link.close()


def test_a_batch_rejected_max_attempts_times_is_dropped_with_an_error(caplog):
    learner = ScriptedLearner(['nack', 'nack', 'nack'])
    link = ActorLink('127.0.0.1', learner.port, retry_s=0.05, max_attempts=3)
    try:
        with caplog.at_level(logging.ERROR):
            link.send(7, steps_message(7))
            wait_for(lambda: link.abandoned == 1, 'the batch to be abandoned')
        assert len(learner.received) == 3 and link.unacked == 0
        assert 'rejected 3 times' in caplog.text
    finally:
        link.close()


def test_unacknowledged_batches_are_resent_after_a_reconnect():
    server = LearnerServer('127.0.0.1', 0)
    port = server.port
    link = ActorLink('127.0.0.1', port, retry_s=0.05)
    try:
        for seq in range(3):
            link.send(seq, steps_message(seq, episode=seq))
        wait_for(lambda: len(server.receive(timeout=0.1)) > 0 or False, 'the first batches')
        server.close()  # the learner dies before acknowledging anything
        wait_for(lambda: not link.connected, 'the link to notice')
        assert link.unacked == 3
        server = LearnerServer('127.0.0.1', port)
        received = []
        wait_for(lambda: received.extend(server.receive(timeout=0.1)) or len(received) >= 3,
                 'the resent batches')
        assert [decode(data).number for _, data in received[:3]] == [0, 1, 2]
        server.ack(received[2][0], 2)
        wait_for(lambda: link.unacked == 0, 'the cumulative acknowledgement')
    finally:
        link.close()
        server.close()


def test_weights_failing_verification_are_never_taken(caplog):
    server = LearnerServer('127.0.0.1', 0)
    link = ActorLink('127.0.0.1', server.port, retry_s=0.05)
    try:
        wait_for(lambda: server.num_actors == 1, 'the actor to connect')
        good = encode_weights({'w': np.ones(4, np.float32)}, 3, {'policy': 'p'})
        server.publish(corrupt(good))
        wait_for(lambda: link.weights_received == 1, 'the corrupted weights')
        with caplog.at_level(logging.ERROR):
            assert link.take_weights() is None
        assert 'rejected weights' in caplog.text and 'sha256' in caplog.text
        server.publish(good)
        wait_for(lambda: link.weights_received == 2, 'the good weights')
        update = link.take_weights()
        assert update.version == 3 and np.array_equal(update.tensors['w'], np.ones(4))
        server.publish(good)  # the same version again: keep-latest drops it
        wait_for(lambda: link.weights_received == 3, 'the repeated weights')
        assert link.take_weights() is None
    finally:
        link.close()
        server.close()


def test_the_server_rejects_oversized_frames_by_closing_the_connection():
    server = LearnerServer('127.0.0.1', 0)
    try:
        with socket.create_connection(('127.0.0.1', server.port), timeout=TIMEOUT) as sock:
            wait_for(lambda: server.num_actors == 1, 'the connection')
            sock.sendall((2 ** 31).to_bytes(4, 'little'))
            wait_for(lambda: server.num_actors == 0, 'the server to drop the peer')
    finally:
        server.close()


def test_ack_envelopes_are_schema_checked():
    ack = decode(encode_ack(5, False, 'bad'), ACK_SCHEMA)
    assert ack.number == 5 and ack.meta == {'ok': False, 'reason': 'bad'}
    with pytest.raises(ValueError, match='boolean "ok"'):
        from robot_rl.transport.envelope import encode
        encode(ACK_SCHEMA, 1, {}, {'ok': 'yes'})
