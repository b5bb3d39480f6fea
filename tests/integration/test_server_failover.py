"""Crashes and restarts of real nodes: kill -9, SIGTERM hand-over, catch-up (also by snapshot).

Writers run through the client library (which follows redirects and retries
with the same RequestId), and every acknowledged write is checked afterwards:
an acknowledged write must never be lost.
"""
from __future__ import annotations

import os
import re
import threading
import time

import grpc
import pytest

from kvstore.client import Client, ExponentialBackoff
from kvstore.launcher import LocalCluster
from kvstore.storage import boot_guard
from kvstore.v1 import kv_pb2

from server_cluster import caught_up, kv_stub, settled, trailing

pytestmark = pytest.mark.timeout(240)


class Writer(threading.Thread):
    """Puts distinct keys in a loop; remembers which were acknowledged and which failed."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=30,
                             retry=ExponentialBackoff(base=0.02, cap=0.3, deadline=30))
        self.prefix = prefix
        self.acked: list[str] = []
        self.failed: list[tuple[str, Exception]] = []
        self.ack_times: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            key = f"{self.prefix}/{n:06d}"
            try:
                self.client.put(key, str(n))
                self.acked.append(key)
                self.ack_times.append(time.monotonic())
            except Exception as e:  # recorded, asserted on by the test
                self.failed.append((key, e))
            n += 1

    def wait_for_acks(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.acked) + count
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"writes stalled at {len(self.acked)} acks; failed: {self.failed[-3:]}"
            time.sleep(0.02)

    def finish(self) -> None:
        self._halt.set()
        self.join(60)
        self.client.close()


def assert_all_present(lc: LocalCluster, member: int, keys: list[str], serializable: bool) -> None:
    kv = kv_stub(lc.client_addr(member))
    prefix = keys[0].split("/")[0].encode() + b"/"
    got = kv.Range(kv_pb2.RangeRequest(key=prefix, range_end=prefix[:-1] + b"0", keys_only=True,
                                       serializable=serializable), timeout=20)
    present = {x.key.decode() for x in got.kvs}
    missing = [k for k in keys if k not in present]
    assert not missing, f"{len(missing)} acknowledged writes lost on member {member}: {missing[:5]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # small snapshot thresholds so the catch-up-by-snapshot test compacts past a stopped member quickly;
    # the durable base moves only at snapshots, so the torn-file test can copy the file at its base
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("failover")),
                                      extra_args=["--snapshot-count", "200", "--snapshot-catchup-entries", "50",
                                                  "--backend-batch-interval", "1h"])
    lc.start()
    try:
        lc.wait_for_leader(60)
        yield lc
    finally:
        lc.stop()


def test_kill_leader_new_leader_no_acknowledged_write_lost(cluster):
    old = settled(cluster)
    w = Writer(cluster.endpoints, "kill")
    w.start()
    try:
        w.wait_for_acks(50)
        cluster.kill(old)
        killed_at = time.monotonic()
        new = cluster.wait_for_leader(30, exclude=old)
        assert new != old
        w.wait_for_acks(50)
        first_ack_after = min(t for t in w.ack_times if t > killed_at)
        print(f"failover: first acknowledged write {first_ack_after - killed_at:.2f}s after kill -9")
    finally:
        w.finish()
    assert not w.failed, f"writes failed during failover: {w.failed[:3]}"
    assert_all_present(cluster, new, w.acked, serializable=False)

    # the killed member restarts on its data and catches up
    cluster.start_node(old)
    caught_up(cluster, old)
    assert_all_present(cluster, old, w.acked, serializable=True)


def test_sigterm_of_leader_hands_over_without_failed_requests(cluster):
    old = settled(cluster)
    w = Writer(cluster.endpoints, "term")
    w.start()
    try:
        w.wait_for_acks(50)
        t0 = time.monotonic()
        code = cluster.stop_node(old)
        stopped_in = time.monotonic() - t0
        assert code == 0, f"member {old} exited with {code}:\n{cluster.log_tail(old)}"
        new = cluster.wait_for_leader(10, exclude=old)
        w.wait_for_acks(50)
    finally:
        w.finish()
    assert not w.failed, f"requests failed across a graceful hand-over: {w.failed[:3]}"
    log = open(cluster.log_path(old)).read()
    assert re.search(r"transferring leadership to member \d", log), "the leader did not hand over"
    assert stopped_in < 10
    assert_all_present(cluster, new, w.acked, serializable=False)
    cluster.start_node(old)
    caught_up(cluster, old)


def test_restarted_member_catches_up_through_a_snapshot(cluster):
    leader = settled(cluster)
    follower = next(i for i in cluster.ids if i != leader)
    cluster.kill(follower)
    before = cluster.status(leader)
    with Client([cluster.client_addr(leader)], timeout=30) as c:
        keys = [f"snap/{i:05d}" for i in range(600)]
        for k in keys:
            c.put(k, "x" * 100)

    def compacted():
        st = cluster.status(leader)
        return st if st.snapshot_index > before.applied_index + 50 else None

    st = cluster.wait_for(compacted, 30, "a snapshot past the stopped member")
    assert st.snapshot_index > before.applied_index
    offset = os.path.getsize(cluster.log_path(follower))
    cluster.start_node(follower)
    caught_up(cluster, follower)  # its applied index jumps when the image is swapped in

    def installed() -> int | None:
        """The index of the snapshot the follower installed since its restart (its log says so first)."""
        with open(cluster.log_path(follower), "rb") as f:
            f.seek(offset)
            m = re.search(rb"installing snapshot at index (\d+)", f.read())
        return int(m[1]) if m else None

    # Its status can show the new applied index a moment before the new snapshot index (the swap
    # runs on the storage thread): the log line is what says how it caught up.
    index = cluster.wait_for(installed, 30, "the follower installing a snapshot")
    assert index > before.applied_index, "the follower should have caught up from a snapshot"
    assert_all_present(cluster, follower, keys, serializable=True)
    # and it keeps replicating normally afterwards
    kv_stub(cluster.client_addr(leader)).Put(kv_pb2.PutRequest(key=b"snap/after", value=b"1"), timeout=10)
    caught_up(cluster, follower)
    got = kv_stub(cluster.client_addr(follower)).Range(kv_pb2.RangeRequest(key=b"snap/after", serializable=True),
                                                       timeout=10)
    assert got.kvs[0].value == b"1"


def data_file(lc: LocalCluster, member: int) -> str:
    return os.path.join(lc.data_dir(member), "db", "current", "data.mdb")


def read_allocated(path: str) -> bytes:
    """The allocated part of a sparse LMDB file (allocated ahead of use, in one range from 0)."""
    with open(path, "rb") as f:
        return f.read(os.fstat(f.fileno()).st_blocks * 512)


def tear_state_machine(lc: LocalCluster, member: int, at_checkpoint: bytes, page: int = 4096) -> None:
    """What an OS crash can leave of an LMDB file committed without fdatasync: the meta pages
    of the newest commit reached the disk, no page written after the last checkpoint did
    (those pages read as zeros). `at_checkpoint` is the file as it was right after it."""
    now = read_allocated(data_file(lc, member))
    with open(data_file(lc, member), "r+b") as f:
        for off in range(2 * page, len(now), page):
            if now[off:off + page] != at_checkpoint[off:off + page]:
                f.seek(off)
                f.write(b"\0" * page)


def test_member_rolls_back_a_state_machine_torn_by_an_os_crash(cluster):
    """LMDB commits are not fdatasynced (--state-machine-sync boot): after a reboot the boot
    guard rolls the state machine back to its durable base (the last checkpoint, which the WAL
    was never compacted past), and the WAL replays the rest."""
    leader = settled(cluster)
    member = next(i for i in cluster.ids if i != leader)
    keys = [f"torn/{i:05d}" for i in range(300)]  # past --snapshot-count: the member has checkpointed
    with Client([cluster.client_addr(leader)], timeout=30) as c:
        for k in keys:
            c.put(k, "x" * 100)
        caught_up(cluster, member)
        for attempt in range(5):  # a copy, then writes that do not reach the member's next checkpoint
            base = cluster.status(member).snapshot_index
            assert base > 0
            at_checkpoint = read_allocated(data_file(cluster, member))
            after = [f"torn/after/{attempt}/{i:03d}" for i in range(30)]
            for k in after:
                c.put(k, "y" * 100)
            keys += after
            caught_up(cluster, member)
            if cluster.status(member).snapshot_index == base:
                break
        else:
            raise AssertionError("the member checkpointed during every attempt")
    cluster.kill(member)
    tear_state_machine(cluster, member, at_checkpoint)

    # Teeth: in the boot that wrote it, the file is trusted (right after a process crash),
    # and this torn one cannot be opened: only the guard's roll-back makes a reboot survivable.
    cluster.start_node(member)
    cluster.wait_for(lambda: not cluster.is_running(member), 60, f"member {member} failing on the torn file")
    assert "MDB_CORRUPTED" in cluster.log_tail(member, 40)

    saved = cluster.env
    cluster.env = {**os.environ, boot_guard.TESTING_BOOT_ID_ENV: "a-boot-after-an-os-crash"}
    try:
        cluster.start_node(member)
    finally:
        cluster.env = saved
    caught_up(cluster, member)
    log = open(cluster.log_path(member)).read()
    assert re.search(rf"rolled back to its durable base at index {base} ", log), log[-2000:]
    assert_all_present(cluster, member, keys, serializable=True)


def test_no_leader_without_a_quorum(cluster):
    leader = settled(cluster)
    survivor = next(i for i in cluster.ids if i != leader)
    for i in cluster.ids:
        if i != survivor:
            cluster.kill(i)
    kv = kv_stub(cluster.client_addr(survivor))

    def refused_with_no_leader():
        try:
            kv.Put(kv_pb2.PutRequest(key=b"q", value=b"1"), timeout=5)
        except grpc.RpcError as e:
            return e if e.details() == "no leader" else None
        raise AssertionError("a lone member accepted a write")

    e = cluster.wait_for(refused_with_no_leader, 30, "'no leader'")
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    md = trailing(e)
    assert "kvstore-leader-id" not in md and "kvstore-leader-addr" not in md
    assert md["kvstore-not-applied"] == "1"
    settled(cluster)
