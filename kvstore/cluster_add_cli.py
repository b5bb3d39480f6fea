"""`kvstore cluster add`: one more member for a running `kvstore cluster up`, learner first, then promoted.

The new member takes the next id's conventional ports (clients on
base + 100*(id-1), peers one above, metrics two above), its data in
DIR/node<id>, its log in DIR/node<id>.log. It runs on its own (it does not
stop with `cluster up`): stop it with `kill PID` (it hands leadership over
first), or remove it with `kvstore member remove ID`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import click

from kvstore.cli import console, fail, make_client
from kvstore.server.config import PORT_STRIDE, format_members

PROMOTE_TIMEOUT_S = 120.0


def add_member(ctx: click.Context, data_dir: str, base_client_port: int, base_peer_port: int) -> None:
    from kvstore.client import KvstoreError

    if os.path.isdir(os.path.join(data_dir, "tls")):
        fail("cluster add does not set up TLS members; add one with `kvstore member add` and `kvstore serve`")
    with make_client(ctx) as c:
        members = c.members()
        guess = max([m.id for m in members]) + 1
        client = f"127.0.0.1:{base_client_port + PORT_STRIDE * (guess - 1)}"
        peer = f"127.0.0.1:{base_peer_port + PORT_STRIDE * (guess - 1)}"
        metrics = f"127.0.0.1:{base_client_port + 2 + PORT_STRIDE * (guess - 1)}"
        new, members = c.member_add([peer], [client], learner=True, name=f"node{guess}")
        console.print(f"member {new.id} added as a learner; starting it (clients {client}, peers {peer})",
                      highlight=False)

        def strip(u: str) -> str:
            return u.split("://", 1)[-1]

        node_dir = os.path.join(os.path.abspath(data_dir), f"node{new.id}")
        cmd = [sys.executable, "-m", "kvstore.server.main", "--id", str(new.id), "--name", new.name,
               "--data-dir", node_dir,
               "--initial-cluster", format_members({m.id: strip(m.peer_urls[0]) for m in members}),
               "--initial-cluster-clients", format_members({m.id: strip(m.client_urls[0]) for m in members}),
               "--initial-cluster-state", "existing", "--listen-metrics-addr", metrics]
        with open(os.path.join(os.path.abspath(data_dir), f"node{new.id}.log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + PROMOTE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                fail(f"member {new.id} exited with code {proc.returncode}; see {node_dir}.log (it is still a "
                     f"learner: `kvstore member remove {new.id}`)")
            try:
                c.member_promote(new.id)
                break
            except KvstoreError as e:
                if time.monotonic() > deadline:
                    fail(f"member {new.id} not promoted within {PROMOTE_TIMEOUT_S:.0f}s: {e}")
                time.sleep(0.5)
    console.print(f"member {new.id} promoted to voter (pid {proc.pid}; stop it with `kill {proc.pid}`)",
                  highlight=False)
