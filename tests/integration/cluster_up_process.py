"""`kvstore cluster up` as a real process, for tests of what an operator sees."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

from kvstore.server.config import PORT_STRIDE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_base_ports(nodes: int = 3) -> tuple[int, int]:
    """(base client port, base peer port) whose whole stride pattern is free right now."""
    for _ in range(200):
        base = random.randrange(30000, 60000 - PORT_STRIDE * nodes, 2)
        ports = [base + PORT_STRIDE * i + k for i in range(nodes) for k in (0, 1)]
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base, base + 1
    raise RuntimeError("no free port range found")


def cluster_up_args(data_dir: str, base: tuple[int, int], nodes: int = 3) -> list[str]:
    return ["--nodes", str(nodes), "--dir", data_dir, "--base-client-port", str(base[0]),
            "--base-peer-port", str(base[1])]


class ClusterUp:
    """`python -m kvstore.cli cluster up ...` off a terminal, its output collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "cluster", "up", *args], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(5)
                raise AssertionError(f"no {text!r} from cluster up (exit {self.proc.poll()}):\n{self.output}")
            time.sleep(0.1)

    def interrupt(self, timeout: float = 90.0) -> int:
        """Ctrl-C's signal; the exit status once it has stopped its nodes."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
