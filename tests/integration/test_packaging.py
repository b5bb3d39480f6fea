"""The sdist and the wheel that `python -m build` makes each install in a fresh venv and run a cluster.

The sdist once lacked native/_wal.pyx and proto/, so `pip install
kvstore-0.1.0.tar.gz` failed ("'native/_wal.pyx' doesn't match any files").
Here `python -m build` makes the sdist and the wheel from that sdist; one fresh
venv gets the wheel, another `pip install`s the sdist (an isolated build, as a
user's pip does); in each, `kvstore --help` works and the venv's own `kvstore`
starts a local cluster and puts a key through it.

Part of `make test` (the check runs once there): about a minute on an idle
2-core machine, mostly compiling the WAL module twice.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.integration.cluster_up_process import ROOT, cluster_up_args, free_base_ports

pytest.importorskip("build", reason="the test extras install `build`")


def run(*cmd: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from it (with this venv's build tools, to save a download)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT, cwd=Path(ROOT))
    return out


def fresh_venv_with(package: Path, where: Path) -> Path:
    """A new venv with `package` (a wheel or an sdist) pip-installed; its bin/."""
    run(sys.executable, "-m", "venv", str(where), cwd=where.parent)
    run(str(where / "bin" / "pip"), "install", "-q", str(package), cwd=where.parent, timeout=1200)
    return where / "bin"


def check_installed(bin_: Path, tmp: Path) -> None:
    """kvstore --help, the package imported from the venv, a local cluster and a put through it."""
    kvstore = str(bin_ / "kvstore")
    assert "cluster" in run(kvstore, "--help", cwd=tmp).stdout
    where = run(str(bin_ / "python"), "-c", "import kvstore._wal, kvstore.v1.kv_pb2 as m; print(m.__file__)",
                cwd=tmp).stdout.strip()
    assert where.startswith(str(bin_.parent)), f"the fresh venv imports kvstore from {where}"  # not this checkout
    base = free_base_ports()
    up = subprocess.Popen([kvstore, "cluster", "up", *cluster_up_args(str(tmp / "data"), base)], cwd=tmp,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        line = ""
        for line in up.stdout:
            if "leader elected" in line or "error" in line:
                break
        assert "leader elected" in line, line
        endpoints = ",".join(f"127.0.0.1:{base[0] + 100 * i}" for i in range(3))
        put = run(kvstore, "--endpoints", endpoints, "--timeout", "30", "put", "packaged", "yes", cwd=tmp)
        assert put.stdout.startswith("OK (revision")
        got = run(kvstore, "--endpoints", endpoints, "--timeout", "30", "get", "packaged", cwd=tmp)
        assert got.stdout.strip() == "yes"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            assert up.wait(90) == 0
        finally:
            up.kill()


def test_the_sdist_has_the_sources_and_no_generated_files(dist):
    (sdist,) = dist.glob("kvstore-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"native/_wal.pyx", "native/crc32c.h", "proto/kvstore/v1/kv.proto", "proto/kvstore/v1/raft.proto"} <= names
    generated = [n for n in names
                 if n.endswith((".so", "_pb2.py", "_pb2_grpc.py")) or (n.startswith("native/") and n.endswith(".c"))]
    assert not generated, "generated files in the sdist"  # kvstore/jepsen/clock_skew.c is a source
    (wheel,) = dist.glob("kvstore-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {"kvstore/v1/kv_pb2.py", "kvstore/py.typed"} <= in_wheel
    assert any(n.startswith("kvstore/_wal.") and n.endswith(".so") for n in in_wheel)


def test_the_wheel_installs_in_a_fresh_venv_and_runs_a_cluster(dist, tmp_path):
    (wheel,) = dist.glob("kvstore-*.whl")
    check_installed(fresh_venv_with(wheel, tmp_path / "venv"), tmp_path)


def test_the_sdist_installs_in_a_fresh_venv_and_runs_a_cluster(dist, tmp_path):
    (sdist,) = dist.glob("kvstore-*.tar.gz")
    check_installed(fresh_venv_with(sdist, tmp_path / "venv"), tmp_path)
