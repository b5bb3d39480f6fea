"""Power cuts at random points under a writer: one real member on its own ext4 disk.

Each cycle: writers put unique keys as fast as the member answers; at a
random moment the disk is shut down (unsynced data and metadata lost), the
process killed, the disk unmounted and mounted again, and the member restarted
under a new boot id. Then every acknowledged put must be there, every key
there must be one that was written with exactly that value, and the member
must start and take writes.

Small snapshot intervals and WAL segments put snapshot creation, log
compaction and segment rolls among the crash points.

The one documented exception to "the member starts" is a reordered torn write
in the last WAL batch (a power cut during its fdatasync persisted later
sectors but not earlier ones). The member then refuses to start, naming the
file, the offset and the repair command; :meth:`PowerCrashRig.restart`
checks that message, runs the command, and the acknowledged-writes check
then shows that what it dropped was never acknowledged.
"""
from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.jepsen.disk import DiskRoot, LoopDisk
from kvstore.launcher import LocalCluster
from kvstore.storage.boot_guard import TESTING_BOOT_ID_ENV

SERVER_ARGS = ["--tick-ms", "10", "--election-ticks", "10", "--snapshot-count", "100",
               "--snapshot-catchup-entries", "20", "--wal-segment-bytes", str(256 << 10)]
WRITERS = 16
# Teeth: what the node process sees when a safety mechanism is switched off.
BREAKS: dict[str, dict[str, str]] = {
    "": {},
    "same-boot": {},                                         # the boot guard never sees a reboot
    "skip-wal-fsync": {"KVSTORE_WAL_TESTING_SKIP_FSYNC": "1"},  # acknowledged before it is durable
}


@dataclass
class Tally:
    attempted: dict[str, str] = field(default_factory=dict)  # key -> value, every put ever sent
    acked: set[str] = field(default_factory=set)    # this cycle's acknowledged puts
    acked_total: int = 0
    present: set[str] = field(default_factory=set)  # keys seen by a check (they must stay)
    cycles: int = 0
    repairs: list[str] = field(default_factory=list)  # the refusal lines that needed a repair
    seconds: list[tuple[float, float, float]] = field(default_factory=list)  # load+cut, restart, check


class PowerCrashRig:
    """A one-member cluster whose data dir is a LoopDisk (use as a context manager)."""

    def __init__(self, base: Path, rng: random.Random, breaks: str = "") -> None:
        """``breaks`` (teeth, see BREAKS) switches off one safety mechanism."""
        if breaks not in BREAKS:
            raise ValueError(f"unknown break {breaks!r}: one of {sorted(BREAKS)}")
        self.rng = rng
        self.breaks = breaks
        self.boot_id = str(uuid.uuid4())
        self.root = DiskRoot(base / "root")
        self.cluster = LocalCluster.with_free_ports(str(self.root.path), nodes=1, extra_args=SERVER_ARGS)
        self.disk = LoopDisk(base / "node1.ext4", self.cluster.data_dir(1))
        self.tally = Tally()

    def __enter__(self) -> PowerCrashRig:
        self.root.__enter__()
        self.disk.create()
        self._boot()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cluster.stop()
        finally:
            try:
                self.disk.unmount()
            finally:
                self.root.__exit__()

    def _boot(self) -> None:
        if self.breaks != "same-boot":
            self.boot_id = str(uuid.uuid4())
        self.cluster.node_env[1] = {TESTING_BOOT_ID_ENV: self.boot_id, **BREAKS[self.breaks]}
        self.cluster.start_node(1)

    # ------------------------------------------------------------------ one cycle

    def cycle(self, load_seconds: float) -> None:
        """Write, cut the power at a random moment, restart, check."""
        try:
            asyncio.run(self._cycle(load_seconds))
        except Exception as error:
            raise AssertionError(f"power cut {self.tally.cycles}: {error}\nthe member's log ends:\n"
                                 f"{self.cluster.log_tail(1, 40)}") from error
        self.tally.cycles += 1

    async def _cycle(self, load_seconds: float) -> None:
        from kvstore.client import AsyncClient, FixedInterval

        t0 = time.monotonic()
        client = AsyncClient(self.cluster.endpoints, timeout=10.0, retry=FixedInterval(interval=0.02))
        first_ack = asyncio.Event()
        n = self.tally.cycles

        async def writer(w: int) -> None:
            i = 0
            while True:
                key = f"k/{n:04d}/{w:02d}/{i:06d}"
                value = f"{key}=" + "x" * self.rng.choice([10, 100, 700, 2000])
                self.tally.attempted[key] = value
                await client.put(key, value)
                self.tally.acked.add(key)
                self.tally.acked_total += 1
                first_ack.set()
                i += 1

        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        try:
            await asyncio.wait_for(first_ack.wait(), 60)
            await asyncio.sleep(self.rng.uniform(0.0, load_seconds))
            self.disk.cut()        # from here on nothing reaches the disk
            self.cluster.kill(1)
            self.disk.unmount()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            t1 = time.monotonic()
            try:
                # Puts still in flight keep retrying (same client id and sequence number) and may
                # land on the restarted member: unacknowledged here, allowed to be there.
                await asyncio.to_thread(self.restart)
            finally:
                await client.close()
        t2 = time.monotonic()
        await self._check()
        self.tally.seconds.append((t1 - t0, t2 - t1, time.monotonic() - t2))

    def restart(self) -> None:
        """Power on and start under a new boot id; repair a refused torn WAL tail once."""
        self.disk.power_on()
        self._boot()
        code = self._wait_serving()
        if code is None:
            return
        line = self._refusal()
        assert line, f"the member exited with {code} after a power cut:\n{self.cluster.log_tail(1)}"
        match = re.search(r"kvstore wal repair --data-dir ([^`\s]+)", line)
        assert match and re.search(r"\.wal at offset \d+", line), line
        repair = subprocess.run([sys.executable, "-m", "kvstore.cli", "wal", "repair", "--data-dir",
                                 match.group(1)], capture_output=True, text=True, timeout=60)
        assert repair.returncode == 0, repair.stderr
        assert "dropped" in repair.stdout, repair.stdout
        self.tally.repairs.append(line)
        self._boot()
        code = self._wait_serving()
        assert code is None, f"the member exited with {code} after the repair:\n{self.cluster.log_tail(1)}"

    def _wait_serving(self, timeout: float = 60.0) -> int | None:
        """None once the member leads; its exit code if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.cluster.procs[1]
            if proc.poll() is not None:
                return proc.returncode
            status = self.cluster.status(1, timeout=0.5)
            if status is not None and status.role == "leader":
                return None
            time.sleep(0.02)
        raise TimeoutError(f"the member did not lead within {timeout}s:\n{self.cluster.log_tail(1)}")

    def _refusal(self) -> str:
        lines = self.cluster.log_tail(1, 50).splitlines()
        return next((ln for ln in reversed(lines) if "kvstore wal repair" in ln), "")

    async def _check(self) -> None:
        """Every acknowledged put is there; everything there was written, with that value.

        This cycle's keys are read whole; earlier cycles' (read whole when
        they were checked) are counted, so a check costs the same at cycle 200.
        """
        from kvstore.client import AsyncClient

        n = self.tally.cycles
        async with AsyncClient(self.cluster.endpoints, timeout=30.0) as client:
            # A write of this term first: it commits (and applies) everything before it.
            await client.put(f"sentinel/{n}", "x")
            this_cycle = await client.range(f"k/{n:04d}/", prefix=True)
            total = (await client.range("k/", prefix=True, count_only=True)).count
        got = {kv.key.decode(): kv.value.decode() for kv in this_cycle.kvs}
        lost = sorted(self.tally.acked - got.keys())
        assert not lost, f"{len(lost)} acknowledged puts lost, e.g. {lost[:5]}"
        invented = sorted(k for k, v in got.items() if self.tally.attempted.get(k) != v)
        assert not invented, f"{len(invented)} keys never written with that value, e.g. {invented[:5]}"
        # What is there now counts as written from now on (unacknowledged puts may have landed).
        self.tally.present |= got.keys()
        self.tally.acked = set()
        assert total == len(self.tally.present), \
            f"{total} keys under k/, {len(self.tally.present)} expected: earlier cycles' keys lost or invented"
