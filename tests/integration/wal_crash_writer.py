"""Crash-test writer: appends to a RaftLog forever and reports each acknowledged batch.

Run as `python wal_crash_writer.py DIR SEED`. After every append returns (the
fdatasync is done) it prints and flushes one line:

    A <first> <last> <term>    entries first..last now have `term` (and any
                               older entries >= first are gone)
    C <index>                  snapshot recorded and the log compacted to index

Entry data is a function of (index, term), so the checker can verify every
byte it finds. The parent kills this process with SIGKILL at random moments.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kvstore.raft.types import Entry, HardState, SnapshotMetadata
from kvstore.storage.raft_log import RaftLog


def payload(index: int, term: int) -> bytes:
    n = 16 + (index * 7919 + term) % 600
    seed = f"{index}:{term};".encode()
    return (seed * (n // len(seed) + 1))[:n]


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    log = RaftLog.open(path, segment_bytes=256 << 10)
    last = log.last_index()
    term = log.term(last) if last else 1
    print(f"R {log.first_index()} {last}", flush=True)
    while True:
        if last - log.first_index() > 8 and rng.random() < 0.1:
            term += 1
            first = last - rng.randint(0, 8)  # conflict: replace a suffix
        else:
            first = last + 1
        n = rng.choice([1, 1, 4, 16, 64, 256])
        log.append([Entry(term, i, data=payload(i, term)) for i in range(first, first + n)],
                   HardState(term, 1, max(0, first - 1)))
        last = first + n - 1
        print(f"A {first} {last} {term}", flush=True)
        at = last - 200
        # A replaced suffix can move `at` below an earlier compaction point: skip those.
        if rng.random() < 0.03 and at >= log.first_index():
            log.set_snapshot(SnapshotMetadata(at, log.term(at)))
            log.compact(at)
            print(f"C {at}", flush=True)


if __name__ == "__main__":
    main()
