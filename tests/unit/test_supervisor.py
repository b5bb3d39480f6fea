"""The supervisor: whatever fails, and wherever, the process prints one line and exits 70 at once.

Each case runs in a child process (fatal ends the process it runs in).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

from kvstore.server.supervisor import describe
from kvstore.storage.storage_fault import StorageFault

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_child(body: str) -> tuple[int, list[str], float]:
    code = textwrap.dedent(f"""
        import asyncio, logging, sys, threading, time
        sys.path.insert(0, {ROOT!r})
        from kvstore.server import supervisor
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    """) + textwrap.dedent(body)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stderr.splitlines(), time.monotonic() - t0


def fatal_lines(lines: list[str]) -> list[str]:
    return [x for x in lines if "FATAL" in x]


def test_a_storage_fault_is_one_line_naming_the_operation_and_the_file():
    e = StorageFault("fsync", "/data/snap", errno.EIO, "Input/output error")
    assert describe("the storage thread", e) == "fsync /data/snap: [Errno 5] Input/output error (in the storage thread)"
    plain = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/snap/x.snap")
    assert describe("sending snapshot 7", plain) == \
        "sending snapshot 7 /data/snap/x.snap: [Errno 2] No such file or directory"


def test_a_bug_is_one_line_naming_the_code_that_raised_it():
    try:
        raise AssertionError("commit 9 beyond\nlast index 8")
    except AssertionError as e:
        line = describe("raft step", e)
    assert line.startswith("raft step: AssertionError: commit 9 beyond last index 8 (raised at ")
    assert line.endswith(f"{__file__}:{test_a_bug_is_one_line_naming_the_code_that_raised_it.__code__.co_firstlineno + 2})")


def test_an_exception_in_a_worker_thread_ends_the_process():
    code, lines, _ = run_child("""
        def work():
            raise OSError(5, "Input/output error", "/d/wal/0000000000000001.wal")
        threading.Thread(target=supervisor.guarded("the storage thread", work)).start()
        time.sleep(30)
        print("still running")
    """)
    assert code == 70
    assert fatal_lines(lines) == ["CRITICAL FATAL: the storage thread /d/wal/0000000000000001.wal: "
                                  "[Errno 5] Input/output error"]


def test_a_task_that_dies_ends_the_process_and_a_cancelled_one_does_not():
    code, lines, _ = run_child("""
        async def dies():
            await asyncio.sleep(0.05)
            raise RuntimeError("broken")
        async def main():
            quiet = supervisor.watch(asyncio.ensure_future(asyncio.sleep(10)), "the quiet loop")
            quiet.cancel()
            supervisor.watch(asyncio.ensure_future(dies()), "the tick loop")
            await asyncio.sleep(30)
        asyncio.run(main())
    """)
    assert code == 70
    [line] = fatal_lines(lines)
    assert line.startswith("CRITICAL FATAL: the tick loop: RuntimeError: broken (raised at <string>:")


def test_two_threads_failing_at_once_print_one_line():
    code, lines, _ = run_child("""
        go = threading.Barrier(8)
        def work(i):
            go.wait()
            raise OSError(5, "Input/output error", f"/d/file{i}")
        for i in range(8):
            threading.Thread(target=supervisor.guarded("thread", work, i)).start()
        time.sleep(30)
    """)
    assert code == 70
    assert len(fatal_lines(lines)) == 1, lines


def test_a_hook_that_hangs_does_not_delay_the_exit_beyond_its_bound():
    code, lines, _ = run_child("""
        supervisor.on_fatal(lambda: time.sleep(30))
        print("failing at", time.monotonic(), file=sys.stderr, flush=True)
        supervisor.fatal("the Ready loop", OSError(5, "Input/output error", "/d/db/current/data.mdb"))
    """)
    exited = time.monotonic()  # CLOCK_MONOTONIC is one clock for every process on the machine
    failed = float(next(x for x in lines if x.startswith("failing at")).split()[-1])
    assert code == 70 and len(fatal_lines(lines)) == 1
    assert exited - failed < 2.0, f"exit took {exited - failed:.1f}s with a hanging hook"
