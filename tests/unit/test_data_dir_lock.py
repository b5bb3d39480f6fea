"""One process per data dir, and the lock names the holder's pid."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.storage.data_dir_lock import DataDirInUse, data_dir_holder, lock_data_dir

HOLD = """
import sys, time
from kvstore.storage.data_dir_lock import lock_data_dir
lock_data_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    d = str(tmp_path / "node1")
    assert data_dir_holder(d) is None  # no LOCK file yet
    holder = subprocess.Popen([sys.executable, "-c", HOLD, d], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert data_dir_holder(d) == holder.pid
        with pytest.raises(DataDirInUse) as e:
            lock_data_dir(d)
        assert str(e.value) == f"data dir {d} is in use by pid {holder.pid}"
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the process; the stale pid in the file blocks nothing
    assert data_dir_holder(d) is None
    fd = lock_data_dir(d)
    try:
        assert open(os.path.join(d, "LOCK")).read().strip() == str(os.getpid())
    finally:
        os.close(fd)
