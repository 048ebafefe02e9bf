"""Actor <-> learner over TCP without ROS: length-prefixed envelopes, acknowledged delivery.

    learner: server = LearnerServer('127.0.0.1', 0); port = server.port
             for peer, data in server.receive(timeout=0.1): ... server.ack(peer, seq)
             server.publish(weights_bytes)               # keep-latest, to every actor
    actor:   link = ActorLink('127.0.0.1', port)
             link.send(seq, encode_steps(...))           # returns at once
             update = link.take_weights()                # newest verified weights, or None

Frames are `u32 length | envelope bytes` (robot_rl.transport.envelope: schema-checked and
checksummed, never pickle). Step batches flow actor -> learner; acknowledgements and weights flow
back. Delivery is at-least-once and durable: the actor keeps every batch until the learner
acknowledges it *durable* (`ack(seq)` means "every batch up to seq is stored on disk"), and after a
reconnect it resends the unacknowledged ones in order; the learner ignores repeats. A batch that
fails verification is rejected with a reason (`ok=False`) and the actor resends it, up to
`max_attempts` times. The actor's background thread never blocks the control loop, and when the
learner is gone it keeps retrying while the actor keeps its last weights.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import select
import socket
import struct
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from robot_rl.transport.envelope import decode, encode, EnvelopeError, peek, register_schema
from robot_rl.transport.weights import decode_weights, VersionGate, WEIGHTS_SCHEMA, WeightUpdate

logger = logging.getLogger(__name__)

ACK_SCHEMA = 'robot_rl.ack/1'
_LENGTH = struct.Struct('<I')
MAX_FRAME_BYTES = 1 << 30
SOCKET_TIMEOUT_S = 10.0
"""A peer that does not take a frame within this long is dropped (never blocks forever)."""


@register_schema(ACK_SCHEMA)
def _check_ack(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    if arrays:
        raise EnvelopeError('an ack carries no arrays')
    if not isinstance(meta.get('ok'), bool) or not isinstance(meta.get('reason', ''), str):
        raise EnvelopeError('ack meta needs a boolean "ok" and a string "reason"')


def encode_ack(seq: int, ok: bool = True, reason: str = '') -> bytes:
    """ok: every batch up to `seq` is durable. not ok: batch `seq` (-1: unknown) was rejected."""
    return encode(ACK_SCHEMA, seq, {}, {'ok': ok, 'reason': reason})


def frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f'frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}')
    return _LENGTH.pack(len(data)) + data


class FrameReader:
    """Accumulates received bytes and yields complete frames."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise ConnectionError(f'peer announced a {length}-byte frame (limit '
                                      f'{MAX_FRAME_BYTES}); closing the connection')
            if len(self._buffer) < _LENGTH.size + length:
                return
            yield bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[:_LENGTH.size + length]


# ----------------------------------------------------------------------------- learner side


@dataclasses.dataclass
class _Peer:
    id: int
    sock: socket.socket
    address: Tuple[str, int]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    alive: bool = True


class LearnerServer:
    """Accepts actors; `receive` returns their frames; `ack` and `publish` answer them.

    One thread accepts, one thread per actor reads; writes happen on the caller's thread under a
    per-actor lock with a timeout, so a stalled actor is dropped instead of blocking training.
    The newest published weights are also sent to every actor as soon as it connects.
    """

    def __init__(self, host: str = '127.0.0.1', port: int = 0):
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self._inbox: 'queue.Queue[Tuple[int, bytes]]' = queue.Queue()
        self._peers: Dict[int, _Peer] = {}
        self._lock = threading.Lock()
        self._latest_weights: Optional[bytes] = None
        self._closed = threading.Event()
        self._next_id = 0
        threading.Thread(target=self._accept, name='learner-accept', daemon=True).start()

    @property
    def num_actors(self) -> int:
        with self._lock:
            return sum(p.alive for p in self._peers.values())

    def receive(self, timeout: float = 0.0, limit: int = 64) -> List[Tuple[int, bytes]]:
        """Frames received since the last call (waits up to `timeout` for the first)."""
        out = []
        try:
            out.append(self._inbox.get(timeout=timeout) if timeout > 0 else
                       self._inbox.get_nowait())
            while len(out) < limit:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def ack(self, peer: int, seq: int, ok: bool = True, reason: str = '') -> None:
        with self._lock:
            target = self._peers.get(peer)
        if target is not None:
            self._send(target, frame(encode_ack(seq, ok, reason)))

    def publish(self, weights: bytes) -> None:
        """Send weight-envelope bytes to every connected actor (and to later ones)."""
        with self._lock:
            self._latest_weights = weights
            peers = list(self._peers.values())
        data = frame(weights)
        for peer in peers:
            self._send(peer, data)

    def close(self) -> None:
        self._closed.set()
        try:  # wakes the accepting thread, which otherwise keeps the port bound
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            self._drop(peer, 'server closing')

    def _send(self, peer: _Peer, data: bytes) -> None:
        try:
            with peer.lock:
                peer.sock.sendall(data)
        except OSError as err:
            self._drop(peer, f'send failed: {err}')

    def _drop(self, peer: _Peer, reason: str) -> None:
        with self._lock:
            if not peer.alive:
                return
            peer.alive = False
            self._peers.pop(peer.id, None)
        logger.info('actor %s disconnected (%s)', peer.address, reason)
        try:
            peer.sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            sock.settimeout(SOCKET_TIMEOUT_S)
            with self._lock:
                peer = _Peer(self._next_id, sock, address)
                self._next_id += 1
                self._peers[peer.id] = peer
                weights = self._latest_weights
            logger.info('actor connected from %s', address)
            if weights is not None:
                self._send(peer, frame(weights))
            threading.Thread(target=self._read, args=(peer,), name=f'learner-read-{peer.id}',
                             daemon=True).start()

    def _read(self, peer: _Peer) -> None:
        reader = FrameReader()
        while peer.alive and not self._closed.is_set():
            try:
                data = peer.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as err:
                return self._drop(peer, str(err))
            if not data:
                return self._drop(peer, 'closed by the actor')
            try:
                for message in reader.feed(data):
                    self._inbox.put((peer.id, message))
            except ConnectionError as err:
                return self._drop(peer, str(err))


# ----------------------------------------------------------------------------- actor side


class ActorLink:
    """The actor's end: `send` queues a batch, a background thread delivers it (see module doc).

    max_attempts: a batch the learner rejects is resent up to this many times in all, then
    dropped with an error (it is malformed at the source; resending cannot fix it).
    """

    def __init__(self, host: str, port: int, retry_s: float = 0.5, max_attempts: int = 3):
        self.address = (host, port)
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self._pending: 'collections.OrderedDict[int, bytes]' = collections.OrderedDict()
        self._attempts: Dict[int, int] = collections.defaultdict(int)
        self._to_send: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._weights: Optional[bytes] = None
        self._gate = VersionGate()
        self.connected = False
        self.rejected = 0
        """Batches the learner rejected (each is resent, up to max_attempts)."""
        self.abandoned = 0
        """Batches dropped after max_attempts rejections."""
        self.acked_through = -1
        self.weights_received = 0
        """Weight messages received (verified only when taken)."""
        self._thread = threading.Thread(target=self._run, name='actor-link', daemon=True)
        self._thread.start()

    @property
    def unacked(self) -> int:
        """Batches sent or queued that the learner has not yet confirmed durable."""
        with self._lock:
            return len(self._pending)

    def send(self, seq: int, data: bytes) -> None:
        """Queue envelope bytes numbered `seq` (rising); never blocks on the network."""
        with self._lock:
            self._pending[seq] = data
            self._to_send.append(seq)
        self._wake.set()

    def take_weights(self) -> Optional[WeightUpdate]:
        """The newest verified weights not yet taken, or None; bad ones are logged, skipped."""
        with self._lock:
            data, self._weights = self._weights, None
        if data is None:
            return None
        try:
            update = decode_weights(data)
        except EnvelopeError as err:
            logger.error('rejected weights from the learner: %s', err)
            return None
        return update if self._gate.accept(update.version) else None

    def wait_until_acked(self, timeout: float) -> bool:
        """Block until every queued batch is confirmed durable (for shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.unacked and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.unacked

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=5)

    # -- the background thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=SOCKET_TIMEOUT_S)
            except OSError:
                self._closed.wait(self.retry_s)
                continue
            self.connected = True
            with self._lock:  # a new connection: everything unacknowledged goes again, in order
                self._to_send = collections.deque(self._pending)
            try:
                self._serve(sock)
            except (OSError, ConnectionError, EnvelopeError) as err:
                logger.warning('learner link lost (%s); retrying every %.1f s', err, self.retry_s)
            finally:
                self.connected = False
                sock.close()
            self._closed.wait(self.retry_s)

    def _serve(self, sock: socket.socket) -> None:
        reader = FrameReader()
        while not self._closed.is_set():
            self._send_queued(sock)
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError('closed by the learner')
                for message in reader.feed(data):
                    self._handle(message)

    def _send_queued(self, sock: socket.socket) -> None:
        while True:
            with self._lock:
                while self._to_send and self._to_send[0] not in self._pending:
                    self._to_send.popleft()  # acknowledged meanwhile
                if not self._to_send:
                    return
                seq = self._to_send.popleft()
                data = self._pending[seq]
                self._attempts[seq] += 1
            sock.sendall(frame(data))

    def _handle(self, message: bytes) -> None:
        if peek(message)[0] == WEIGHTS_SCHEMA:
            with self._lock:  # keep-latest: verified when taken
                self._weights = message
                self.weights_received += 1
            return
        ack = decode(message, ACK_SCHEMA)
        with self._lock:
            if ack.meta['ok']:
                self.acked_through = max(self.acked_through, ack.number)
                for seq in [s for s in self._pending if s <= ack.number]:
                    del self._pending[seq]
                    self._attempts.pop(seq, None)
                return
            self.rejected += 1
            logger.warning('learner rejected batch %d: %s', ack.number, ack.meta['reason'])
            retry = [ack.number] if ack.number in self._pending else list(self._pending)
            for seq in retry:
                if self._attempts[seq] >= self.max_attempts:
                    logger.error('batch %d rejected %d times; dropping it', seq,
                                 self._attempts[seq])
                    del self._pending[seq]
                    self.abandoned += 1
                else:
                    self._to_send.append(seq)
