"""Kill -9 a process that appends to the WAL, many times; nothing acknowledged may be lost.

The writer (wal_crash_writer.py) prints a line only after append() returned,
that is after the fdatasync. kill -9 loses the process but not the page cache,
so this exercises torn writes at page boundaries (a SIGKILL can interrupt a
large write), recovery cutting them, segment rolls and compaction mid-flight -
not power loss.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from kvstore.storage.raft_log import RaftLog

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from wal_crash_writer import payload  # noqa: E402

ROUNDS = 60


def test_every_acknowledged_entry_survives_sigkill(tmp_path):
    rng = random.Random(int(os.environ.get("WAL_CRASH_SEED", "1")))
    path = str(tmp_path / "wal")
    acked: dict[int, int] = {}  # index -> term of every acknowledged, not-yet-superseded entry
    compacted = 0
    deadline = time.monotonic() + 55
    rounds = 0
    while rounds < ROUNDS and time.monotonic() < deadline:
        # Unbuffered: a buffered readline() below would read ahead acknowledgements that
        # communicate() (which reads the pipe's fd directly) then never sees.
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "wal_crash_writer.py"), path, str(rounds)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        # wait until it is writing, then kill at a random moment
        first_line = proc.stdout.readline()
        assert first_line.startswith(b"R "), proc.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        for line in out.decode().splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # killed mid-print: not an acknowledgement
            kind, *nums = line.split()
            if kind == "A":
                first, last, term = map(int, nums)
                for i in [i for i in acked if i >= first]:
                    del acked[i]
                acked.update((i, term) for i in range(first, last + 1))
            elif kind == "C":
                compacted = int(nums[0])
        rounds += 1

        with RaftLog.open(path, segment_bytes=256 << 10) as log:
            snap = log.snapshot().metadata  # compaction never passes the recorded snapshot
            assert snap.index >= compacted and log.first_index() <= snap.index + 1
            assert log.term(snap.index) == snap.term
            lo, last = log.first_index(), log.last_index()
            ents = log.entries(lo, last + 1)
            assert [e.index for e in ents] == list(range(lo, last + 1))
            prev = log.term(lo - 1)
            for e in ents:
                assert e.term >= prev, f"terms go backwards at {e.index}"
                prev = e.term
                assert e.data == payload(e.index, e.term), f"entry {e.index} damaged"
            # Every acknowledged entry is there, except where the one write in flight at the
            # kill (unacknowledged, but it may have reached the page cache) replaced a suffix.
            changed = [i for i in acked if i >= lo and (i > last or log.term(i) != acked[i])]
            if changed:
                k = min(changed)
                tail = [e for e in ents if e.index >= k]
                assert tail and len({e.term for e in tail}) == 1 and tail[0].term > acked[k], \
                    f"acknowledged entry {k} (term {acked[k]}) lost"
            hs, _ = log.initial_state()
            assert hs.term >= max(acked.values(), default=0)
            # unacknowledged survivors are fine, and from now on they count as the log
            acked = {e.index: e.term for e in ents}
    assert rounds >= 50, f"only {rounds} rounds in the time budget"
