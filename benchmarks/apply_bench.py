"""LMDB state machine apply rate: entries/s and ops/s per batch size.

Each case applies pre-serialized committed entries through StateMachine.apply
(one LMDB write transaction per call) and prints a table:

  * 1, 16 and 256 entries per apply, each entry one 256-byte put;
  * one Batch command of 64 puts per entry (1 and 16 entries per apply).

Every command carries a client id and seq, so the exactly-once session table
is written too (as on a real node); "--no-sessions" uses client_id 0 instead.
"--clients N" spreads the commands over N client ids (default 64); `kvstore
bench` uses one id per load process, so "--clients 2" is its shape, where a
batch holds many commands of each session (read and written once per batch).
Both durability modes run: fsync (the default: one fdatasync per apply) and
nosync. Keys are drawn from 100k keys, so puts mix inserts and updates.

Usage: python benchmarks/apply_bench.py [--seconds 2] [--dir /tmp] [--no-sessions] [--clients 64]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

VALUE_BYTES = 256
KEYSPACE = 100_000
CLIENTS = 64


def make_entries(n_entries: int, ops_per_entry: int, sessions: bool, rng: random.Random, clients: int = CLIENTS):
    """n serialized Commands; client seqs advance and acked_below trails by 8."""
    value = bytes(rng.getrandbits(8) for _ in range(VALUE_BYTES))
    seqs = [0] * clients
    out = []
    for i in range(n_entries):
        ops = [
            kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"key/%08d" % rng.randrange(KEYSPACE), value=value))
            for _ in range(ops_per_entry)
        ]
        cmd = command_pb2.Command(leader_clock_ms=1_000_000 + i, ops=ops)
        if sessions:
            c = i % clients
            seqs[c] += 1
            cmd.request_id.CopyFrom(
                kv_pb2.RequestId(
                    client_id=c + 1, seq=seqs[c], acked_below=max(1, seqs[c] - 8), opens_session=seqs[c] == 1
                )
            )
        out.append(cmd.SerializeToString())
    return out


def run_case(base: str, fsync: bool, per_apply: int, ops_per_entry: int, seconds: float, sessions: bool,
             clients: int = CLIENTS):
    rng = random.Random(42)
    path = tempfile.mkdtemp(dir=base)
    sm = StateMachine.open(path, 8 << 30, fsync=fsync)
    # Enough entries for the time budget at an optimistic rate, built up front.
    n = max(per_apply * 20, min(200_000, int(60_000 * seconds / ops_per_entry)))
    n -= n % per_apply
    datas = make_entries(n, ops_per_entry, sessions, rng, clients)
    index, done, applies = 0, 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < n and time.perf_counter() < deadline:
        batch = [(index + j + 1, 1, datas[done + j]) for j in range(per_apply)]
        sm.apply(batch)
        index += per_apply
        done += per_apply
        applies += 1
    elapsed = time.perf_counter() - start
    size = sm.db_size()
    sm.close()
    shutil.rmtree(path)
    return done / elapsed, done * ops_per_entry / elapsed, applies / elapsed, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per case")
    ap.add_argument("--dir", default=None, help="where to put the LMDB files (default: a temp dir)")
    ap.add_argument("--no-sessions", action="store_true", help="client_id 0: no session table writes")
    ap.add_argument("--clients", type=int, default=CLIENTS, help="client ids the commands are spread over")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="apply_bench-", dir=args.dir)
    sessions = not args.no_sessions
    cases = [(1, 1), (16, 1), (256, 1), (1, 64), (16, 64)]
    print(f"LMDB apply, {VALUE_BYTES} B puts, sessions={'on' if sessions else 'off'} ({args.clients} clients), dir={base}")
    print(f"{'durability':<10} {'entries/apply':>13} {'ops/entry':>9} {'applies/s':>10} {'entries/s':>10} {'ops/s':>10} {'db size':>9}")
    try:
        for fsync in (True, False):
            for per_apply, ops_per_entry in cases:
                eps, ops, aps, size = run_case(base, fsync, per_apply, ops_per_entry, args.seconds, sessions, args.clients)
                mode = "fsync" if fsync else "nosync"
                print(f"{mode:<10} {per_apply:>13} {ops_per_entry:>9} {aps:>10,.0f} {eps:>10,.0f} {ops:>10,.0f} {size / 2**20:>7.1f}Mi", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
