"""WAL append rate: the Cython Wal against a plain os.write + os.fdatasync loop.

Both sides write the same batches (1, 16, 256 entries of 256 B) to the same
file system, one write and one fdatasync per batch, so the comparison shows
what the native path costs on top of the disk: encoding, CRC32C, index upkeep.
The plain loop writes raw payloads with no framing at all (its best case).

    python benchmarks/wal_bench.py [--dir DIR] [--seconds 2]

Goals (issue 3): batch-of-1 fsync rate >= 0.95x the plain loop; >= 500k
entries/s at batch 256.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.raft.types import Entry
from kvstore.storage.wal import Wal

ENTRY_BYTES = 256
BATCHES = (1, 16, 256)


def bench_plain(path: str, batch: int, seconds: float) -> tuple[float, float]:
    """os.write of the concatenated payloads + os.fdatasync, appending to one file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    payload = os.urandom(ENTRY_BYTES)
    n = syncs = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.write(fd, b"".join([payload] * batch))
            os.fdatasync(fd)
            n += batch
            syncs += 1
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n / dt, syncs / dt


def bench_wal(path: str, batch: int, seconds: float) -> tuple[float, float]:
    """Wal.append of Entry objects (built outside the timed region, as the node hands them over)."""
    payload = os.urandom(ENTRY_BYTES)
    w = Wal(path, 64 << 20)
    index = 1
    n = syncs = 0
    pool = [[Entry(1, 0, data=payload) for _ in range(batch)] for _ in range(64)]
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            ents = pool[syncs % 64]
            for e in ents:  # renumber: cheap, and the Wal insists on consecutive indexes
                e.index = index
                index += 1
            w.append(ents)
            n += batch
            syncs += 1
        dt = time.perf_counter() - t0
    finally:
        w.close()
    return n / dt, syncs / dt


def bench_encode_only(path: str, batch: int, seconds: float) -> float:
    """Entries/s with fdatasync skipped (test switch): the CPU cost of the native path alone."""
    payload = os.urandom(ENTRY_BYTES)
    w = Wal(path, 64 << 20)
    w.testing_skip_fsync = True
    index, n = 1, 0
    ents = [Entry(1, 0, data=payload) for _ in range(batch)]
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            for e in ents:
                e.index = index
                index += 1
            w.append(ents)
            n += batch
        dt = time.perf_counter() - t0
    finally:
        w.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="wal_bench_", dir=args.dir)
    try:
        print(f"WAL append benchmark: entries of {ENTRY_BYTES} B, {args.seconds:.1f} s per cell, dir {root}")
        header = f"{'batch':>5} | {'plain entries/s':>15} {'plain fsync/s':>13} | {'wal entries/s':>13} " \
                 f"{'wal fsync/s':>11} | {'wal/plain':>9} | {'wal no-fsync entries/s':>22}"
        print(header)
        print("-" * len(header))
        results = {}
        for batch in BATCHES:
            # alternate runs so slow drift of the disk hits both sides alike
            plain = wal = (0.0, 0.0)
            for r in range(2):
                p = bench_plain(os.path.join(root, f"plain{batch}.{r}"), batch, args.seconds / 2)
                q = bench_wal(os.path.join(root, f"wal{batch}.{r}"), batch, args.seconds / 2)
                plain = (plain[0] + p[0] / 2, plain[1] + p[1] / 2)
                wal = (wal[0] + q[0] / 2, wal[1] + q[1] / 2)
                shutil.rmtree(os.path.join(root, f"wal{batch}.{r}"))
                os.unlink(os.path.join(root, f"plain{batch}.{r}"))
            cpu = bench_encode_only(os.path.join(root, f"cpu{batch}"), batch, args.seconds / 2)
            shutil.rmtree(os.path.join(root, f"cpu{batch}"))
            results[batch] = (plain, wal)
            print(f"{batch:>5} | {plain[0]:>15,.0f} {plain[1]:>13,.0f} | {wal[0]:>13,.0f} {wal[1]:>11,.0f} | "
                  f"{wal[1] / plain[1]:>8.2f}x | {cpu:>22,.0f}")
        ratio1 = results[1][1][1] / results[1][0][1]
        rate256 = results[256][1][0]
        print()
        print(f"goal batch-1 fsync rate >= 0.95x plain: {ratio1:.2f}x  {'OK' if ratio1 >= 0.95 else 'MISSED'}")
        print(f"goal >= 500k entries/s at batch 256:    {rate256:,.0f}  {'OK' if rate256 >= 500_000 else 'MISSED'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
