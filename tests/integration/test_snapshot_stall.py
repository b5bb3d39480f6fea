"""A member with a few hundred MiB of data snapshots (and streams an image) without going quiet.

Two real members (1 and 2) hold the data; member 3 is this test, listening on member 3's peer
address and speaking the peer wire protocol: it records when each frame of the leader's message
stream arrives (heartbeats go out every tick to every peer, even one that never answers) and
drains any snapshot image the leader streams to it. Member 3 never acknowledges anything, so the
two real members need each other for a quorum: a stalled follower would cost the leader its
quorum (CheckQuorum) and force an election.

The assertions: while each member snapshots with ~200 MiB of data, the largest gap between two
frames from the leader stays below half the election timeout, and the leader and term never change.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kvstore.server import peer_wire as wire
from kvstore.launcher import LocalCluster
from kvstore.v1 import kv_pb2, raft_pb2

from server_cluster import kv_stub

pytestmark = pytest.mark.timeout(300)

TICK_MS = 100
ELECTION_TICKS = 10
VALUE_BYTES = 96 << 10
FILL_PUTS = 2200  # ~206 MiB of values
SNAPSHOT_COUNT = 2400  # entries between snapshots: each member has its next one after the fill


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    length, kind = wire.FRAME_HEADER.unpack(_read_exact(sock, wire.FRAME_HEADER.size))
    return kind, _read_exact(sock, length) if length else b""


class ListeningMember:
    """Member 3: accepts the real members' connections, timestamps stream frames, drains snapshots."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.server = socket.create_server((host, int(port)), reuse_port=False)
        self.server.settimeout(0.2)
        self.frames: list[tuple[float, int]] = []  # (arrival, sender) of every BATCH frame
        self.snapshot_bytes = 0
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            purpose, _cluster, sender = wire.parse_hello(_read_exact(conn, wire.HELLO.size))
            if purpose == wire.STREAM:
                while not self._halt.is_set():
                    kind, _payload = _read_frame(conn)
                    with self._lock:
                        self.frames.append((time.monotonic(), sender))
            else:
                while True:
                    kind, payload = _read_frame(conn)
                    if kind == wire.SNAPSHOT_DATA:
                        with self._lock:
                            self.snapshot_bytes += len(payload)
                    elif kind == wire.SNAPSHOT_END:
                        break
                ack = raft_pb2.SnapshotAck(ok=False, error="member 3 only listens")
                conn.sendall(wire.frame(wire.SNAPSHOT_ACK, ack.SerializeToString()))
        except (ConnectionError, OSError, struct.error):
            pass
        finally:
            conn.close()

    def max_gap(self, sender: int, since: float, until: float) -> float:
        with self._lock:
            times = [t for t, s in self.frames if s == sender and since <= t <= until]
        times = [since] + times + [until]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self) -> None:
        self._halt.set()
        self.server.close()


def _allocated(path: str) -> int:
    """Bytes of disk the files under `path` occupy (LMDB's file is sparse)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def _status(lc: LocalCluster, i: int):
    st = lc.status(i, timeout=2.0)
    assert st is not None, f"member {i} does not answer: {lc.log_tail(i)}"
    return st


def test_snapshots_with_hundreds_of_mib_do_not_silence_the_leader(tmp_path):
    lc = LocalCluster.with_free_ports(
        str(tmp_path / "cluster"),
        extra_args=["--tick-ms", str(TICK_MS), "--election-ticks", str(ELECTION_TICKS),
                    "--snapshot-count", str(SNAPSHOT_COUNT), "--snapshot-catchup-entries", "100"],
    )
    member3 = ListeningMember(lc.peer_addr(3))
    try:
        lc.start_node(1)
        lc.start_node(2)
        leader = lc.wait_for(lambda: lc.leader(), 60, "a leader among members 1 and 2")
        follower = 3 - leader
        kv = kv_stub(lc.client_addr(leader))
        payload = os.urandom(VALUE_BYTES)

        def put(i: int) -> None:
            value = payload[i % 97:] + payload[: i % 97]  # distinct values, nothing to compress
            kv.Put(kv_pb2.PutRequest(key=b"big/%05d" % i, value=value), timeout=60)

        def put_small(i: int) -> None:
            kv.Put(kv_pb2.PutRequest(key=b"small/%05d" % i, value=b"x"), timeout=60)

        pool = ThreadPoolExecutor(8)
        try:
            list(pool.map(put, range(FILL_PUTS)))
            start = _status(lc, leader)
            before = {i: _status(lc, i).snapshot_index for i in (1, 2)}

            # Cross each member's next snapshot point with small writes, measuring meanwhile.
            t0 = time.monotonic()
            n = 0
            deadline = t0 + 120
            failed = None
            while any(_status(lc, i).snapshot_index <= before[i] for i in (1, 2)):
                assert time.monotonic() < deadline, "no snapshot on both members within 120 s"
                try:
                    list(pool.map(put_small, range(n, n + 32)))
                except grpc.RpcError as e:
                    failed = f"{e.code().name}: {e.details()}"
                    break
                n += 32
            time.sleep(2.0)  # a snapshot's sync runs on after the index moved
            t1 = time.monotonic()
        finally:
            pool.shutdown()

        gap = member3.max_gap(leader, t0, t1)
        for i in (1, 2):
            st = _status(lc, i)
            use = {d: _allocated(os.path.join(lc.data_dir(i), d)) for d in ("db", "wal", "snap")}
            print(f"\nmember {i}: LMDB in use {st.db_size >> 20} MiB, on disk: "
                  + ", ".join(f"{d} {b >> 20} MiB" for d, b in use.items())
                  + f"; total / (LMDB in use + WAL) = {sum(use.values()) / (st.db_size + use['wal']):.2f}")
        end = _status(lc, leader)
        sizes = {i: _status(lc, i).db_size for i in (1, 2)}
        print(f"\nmax gap between the leader's frames: {gap * 1000:.0f} ms over {t1 - t0:.1f} s; "
              f"db sizes {sizes}; snapshot image bytes streamed to member 3: {member3.snapshot_bytes}")
        assert failed is None, f"a write failed while the members snapshotted: {failed}; max gap {gap * 1000:.0f} ms"
        assert min(sizes.values()) > 150 << 20, "the test needs a few hundred MiB per member"
        assert gap < TICK_MS * ELECTION_TICKS / 2 / 1000, \
            f"the leader sent nothing for {gap * 1000:.0f} ms while snapshotting"
        assert (end.leader_id, end.term) == (start.leader_id, start.term), \
            f"leadership moved during the snapshots: {start.leader_id}@{start.term} -> " \
            f"{end.leader_id}@{end.term}"
        assert _status(lc, follower).leader_id == leader
    finally:
        member3.close()
        lc.stop()
