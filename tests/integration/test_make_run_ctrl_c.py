"""Ctrl-C in `make run`, in a real terminal (tmux), stops the cluster and ends quietly with exit status 0.

What a person sees: the live status table, then Ctrl-C, then two lines about
stopping, and make exits 0 with no traceback, no "Interrupt" and no "Error".
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from kvstore.storage.data_dir_lock import data_dir_holder
from tests.integration.cluster_up_process import ROOT, cluster_up_args, free_base_ports

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (make system-deps installs it)"),
    pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "kvstore")),
                       reason="make run uses the checkout's .venv (make build creates it)"),
]


class Terminal:
    """A tmux server of our own (its own socket) running one interactive bash."""

    def __init__(self, cwd: str) -> None:
        self.socket = f"kvstore-test-{os.getpid()}"
        self.tmux("new-session", "-d", "-x", "200", "-y", "60", "-c", cwd, "bash --norc --noprofile")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def type(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "0", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", "0")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            m = re.search(pattern, screen)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen within {timeout}s:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def fresh_make_env() -> dict[str, str]:
    """The make running this test passes its flags down in the environment; ours is a new make."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def test_ctrl_c_in_make_run_stops_the_cluster_quietly_with_exit_0(tmp_path):
    stale = subprocess.run(["make", "-q", "-C", ROOT, ".venv/.kvstore-installed"], env=fresh_make_env(),
                           capture_output=True, timeout=60).returncode
    if stale:
        pytest.skip("the .venv is older than pyproject.toml: make run would reinstall it first (make build)")
    data = str(tmp_path / "data")
    args = " ".join(cluster_up_args(data, free_base_ports()))
    term = Terminal(ROOT)
    try:
        term.type(f'env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s run RUN_ARGS="{args}"; echo "exit status: $?"',
                  "Enter")
        term.wait_for("leader elected", 120)
        term.wait_for(r"│ +[123] │ .* │ leader ", 60)  # the live table is up, showing the leader
        term.type("C-c")
        status = term.wait_for(r"exit status: (\d+)", 90)
    finally:
        term.close()
    screen = status.string
    after = screen[screen.index("leader elected"):]
    assert status.group(1) == "0", screen
    assert "stopped; data kept in" in after, screen
    for noise in ("Traceback", "TypeError", "lost sys.stderr", "Error", "Interrupt"):
        assert noise not in after, screen
    assert all(data_dir_holder(os.path.join(data, f"node{i}")) is None for i in (1, 2, 3))
