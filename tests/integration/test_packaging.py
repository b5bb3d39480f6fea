"""The sdist and the wheel that `python -m build` makes install in a fresh venv and run a cluster.

The sdist once lacked native/_wal.pyx and proto/, so building it (as `pip
install kvstore-0.1.0.tar.gz` does) failed. Here `python -m build` makes the
sdist and then the wheel from that sdist (with this venv's build tools,
--no-isolation, to keep it affordable); the wheel goes into a fresh venv,
whose `kvstore` starts a local cluster and puts a key through it.

Slow (make soak): ~25 s of CPU, mostly compiling the WAL module, and 100 s
to over 200 s of wall time on a loaded 2-core machine.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.integration.cluster_up_process import ROOT, cluster_up_args, free_base_ports

pytest.importorskip("build", reason="the test extras install `build`")


def run(*cmd: str, cwd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_installs_and_runs_a_cluster(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), ROOT, cwd=ROOT)
    (sdist,) = dist.glob("kvstore-*.tar.gz")
    (wheel,) = dist.glob("kvstore-*.whl")

    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"native/_wal.pyx", "native/crc32c.h", "proto/kvstore/v1/kv.proto", "proto/kvstore/v1/raft.proto"} <= names
    assert not [n for n in names if n.endswith((".c", ".so", "_pb2.py"))], "generated files in the sdist"
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {"kvstore/v1/kv_pb2.py", "kvstore/py.typed"} <= in_wheel
    assert any(n.startswith("kvstore/_wal.") and n.endswith(".so") for n in in_wheel)

    venv = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", str(venv), cwd=str(tmp_path))
    bin_ = venv / "bin"
    run(str(bin_ / "pip"), "install", "-q", str(wheel), cwd=str(tmp_path), timeout=600)
    kvstore = str(bin_ / "kvstore")
    assert "cluster" in run(kvstore, "--help", cwd=str(tmp_path)).stdout
    where = run(str(bin_ / "python"), "-c", "import kvstore._wal, kvstore.v1.kv_pb2 as m; print(m.__file__)",
                cwd=str(tmp_path)).stdout.strip()
    assert where.startswith(str(venv)), f"the fresh venv imports kvstore from {where}"  # not this checkout

    base = free_base_ports()
    up = subprocess.Popen([kvstore, "cluster", "up", *cluster_up_args(str(tmp_path / "data"), base)],
                          cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "leader elected" in line or "error" in line:
                break
        assert "leader elected" in line, line
        endpoints = ",".join(f"127.0.0.1:{base[0] + 100 * i}" for i in range(3))
        put = run(kvstore, "--endpoints", endpoints, "--timeout", "30", "put", "packaged", "yes", cwd=str(tmp_path))
        assert put.stdout.startswith("OK (revision")
        got = run(kvstore, "--endpoints", endpoints, "--timeout", "30", "get", "packaged", cwd=str(tmp_path))
        assert got.stdout.strip() == "yes"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            assert up.wait(90) == 0
        finally:
            up.kill()
