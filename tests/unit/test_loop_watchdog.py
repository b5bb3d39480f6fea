"""A blocked event loop is reported: a warning with how long, and every thread's stack while it lasts."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import asyncio, logging, sys, time
    from kvstore.server.loop_watchdog import watch_loop

    def block_the_loop_in_a_named_place():
        time.sleep(2.5)

    async def main():
        watchdog = asyncio.create_task(watch_loop(stacks_after_s=1.0))
        await asyncio.sleep(0.7)  # the watchdog has armed and re-armed
        block_the_loop_in_a_named_place()
        await asyncio.sleep(0.7)  # it turns again: the warning
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        time.sleep(1.5)  # cancelled: no dump any more
        print("done", flush=True)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main())
""")


def test_a_blocked_loop_logs_a_warning_and_every_threads_stack():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
    warnings = [x for x in r.stderr.splitlines() if "the event loop was blocked for" in x]
    assert len(warnings) == 1, r.stderr
    blocked = float(warnings[0].split("blocked for ")[1].split("s")[0])
    assert 2.0 <= blocked < 5.0, warnings[0]
    # faulthandler's dump, taken while the loop was blocked, names the blocking function; once only
    assert r.stderr.count("block_the_loop_in_a_named_place") == 1, r.stderr
    assert r.stderr.count("Timeout (0:00:01)!") == 1, r.stderr
