"""The `kvstore` command: run nodes, a local cluster, and talk to a cluster.

    kvstore cluster up                 # 3 local nodes on 2379/2479/2579, data in ./data
    kvstore put greeting hello
    kvstore get greeting
    kvstore status
    kvstore leader transfer --to 2
    kvstore serve --id 1 ...           # one node (see `kvstore serve --help`)

Client commands talk to `--endpoints` (default: the local cluster, or
$KVSTORE_ENDPOINTS) through the client library, which finds the leader and
retries. Errors are printed as one clear line and exit non-zero; never a
traceback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shlex
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from kvstore import write_out as wo
from kvstore.foreground import in_own_foreground
from kvstore.server.config import DEFAULT_BASE_CLIENT_PORT, DEFAULT_BASE_PEER_PORT, default_client_addr

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class _LazyConsole:
    """A rich Console made on first use, so `kvstore serve` (a node's start) never imports rich.

    Attribute access is forwarded; whatever rich itself drives (Live, Progress) gets `.real`, the
    Console: it uses the console as a context manager, which no forwarding can provide.
    """

    def __init__(self, stderr: bool = False):
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            self._console = Console(stderr=self._stderr, width=None if stream.isatty() else 160)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True)

DEFAULT_ENDPOINTS = ",".join(default_client_addr(i) for i in (1, 2, 3))


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _tls_hint(message: str) -> str:
    """A TLS port closes a plaintext (or certificate-less) handshake without a word; say what may be missing."""
    if "Socket closed" not in message:
        return ""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if not obj:
        return ""
    cacert, cert, _ = obj["tls"]
    if not cacert and not cert and not any(e.startswith("https://") for e in obj["endpoints"]):
        return " (the members may serve TLS: give --cacert, and --cert/--key if they check client certificates)"
    if not cert:
        return " (the members may require a client certificate: give --cert and --key)"
    return ""


def client_errors(fn):
    """Turn every client error into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # gRPC's C core logs each failed TLS handshake to stderr; the one line below says it instead.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from kvstore.client import KvstoreError

        try:
            return fn(*args, **kwargs)
        except KvstoreError as e:
            fail(f"{type(e).__name__}: {e}{_tls_hint(str(e))}")
        except (ValueError, TypeError) as e:
            fail(str(e))

    return wrapper


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


write_out_option = click.option(
    "-w", "--write-out", type=click.Choice(wo.FORMATS), default="simple", show_default=True,
    help="output format: json is one document, shaped like etcdctl's (keys and values base64)")


def show(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return repr(b)


# ------------------------------------------------------------------------------ the group


class _LazyGroup(click.Group):
    """Subcommands that live in their own packages (`jepsen`, `bench`) are imported when used or listed."""

    lazy = {"jepsen": ("kvstore.jepsen.cli", "jepsen"), "bench": ("kvstore.bench", "bench"),
            "certs": ("kvstore.certs", "certs"),
            "check": ("kvstore.maintenance_cli", "check"), "alarm": ("kvstore.maintenance_cli", "alarm"),
            "snapshot": ("kvstore.snapshot_cli", "snapshot"), "member": ("kvstore.member_cli", "member"),
            "user": ("kvstore.auth_cli", "user"), "role": ("kvstore.auth_cli", "role"),
            "auth": ("kvstore.auth_cli", "auth"),
            "lease": ("kvstore.lease_cli", "lease"),
            "lock": ("kvstore.lock_cli", "lock"), "elect": ("kvstore.lock_cli", "elect")}


    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoints", envvar="KVSTORE_ENDPOINTS", default=DEFAULT_ENDPOINTS, show_default=True,
              help="comma-separated client addresses of cluster members")
@click.option("--timeout", default=5.0, show_default=True, help="seconds per command, retries included")
@click.option("--cacert", envvar="KVSTORE_CACERT", default=None, help="TLS: trust the CA in this PEM file")
@click.option("--cert", envvar="KVSTORE_CERT", default=None, help="TLS: client certificate (PEM)")
@click.option("--key", envvar="KVSTORE_KEY", default=None, help="TLS: key of --cert (PEM)")
@click.option("--user", envvar="KVSTORE_USER", default=None, metavar="NAME[:PASSWORD]",
              help="authenticate as this user (the password is asked for when not given)")
@click.pass_context
def main(ctx: click.Context, endpoints: str, timeout: float, cacert: str | None, cert: str | None,
         key: str | None, user: str | None) -> None:
    """kvstore: a replicated key-value store whose nodes agree through Raft."""
    ctx.obj = {"endpoints": [e.strip() for e in endpoints.split(",") if e.strip()], "timeout": timeout,
               "tls": (cacert, cert, key), "user": user}


def client_tls(ctx: click.Context):
    """The TLS settings from --cacert/--cert/--key (None when none is given: plaintext, or https:// endpoints)."""
    from kvstore.client import TLS

    cacert, cert, key = ctx.obj["tls"]
    if not (cacert or cert or key):
        return None
    return TLS(ca=cacert, cert=cert, key=key)


def make_client(ctx: click.Context, **kw):
    from kvstore.client import Client

    from kvstore.auth_cli import credentials

    kw.setdefault("coalesce", False)
    user, password = credentials(ctx.find_root().obj.get("user"))
    return Client(ctx.obj["endpoints"], timeout=ctx.obj["timeout"], tls=client_tls(ctx), user=user,
                  password=password, **kw)


# ------------------------------------------------------------------------------ serve


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Run one node (all flags: `kvstore serve --help`)."""
    from kvstore.server.main import main as server_main

    server_main(list(args), prog="kvstore serve")


# ------------------------------------------------------------------------------ cluster up


@main.group()
def cluster() -> None:
    """A local cluster of real node processes."""


@cluster.command("up")
@click.option("--nodes", default=3, show_default=True, help="number of members")
@click.option("--dir", "data_dir", default="./data", show_default=True, help="data directory (node<i>/ per member)")
@click.option("--base-client-port", default=DEFAULT_BASE_CLIENT_PORT, show_default=True)
@click.option("--base-peer-port", default=DEFAULT_BASE_PEER_PORT, show_default=True)
@click.option("--node-arg", "node_args", multiple=True, help="extra flag passed to every node (repeatable)")
@click.option("--tls", is_flag=True,
              help="TLS for clients (with client certificates) and peers; certificates made in DIR/tls if missing")
@in_own_foreground
def cluster_up(nodes: int, data_dir: str, base_client_port: int, base_peer_port: int, node_args, tls: bool) -> None:
    """Start a local cluster, wait for a leader, show live status; Ctrl-C stops it cleanly."""
    from kvstore.launcher import LocalCluster, NodeFailedToStart

    if nodes < 1:
        fail("--nodes must be >= 1")
    extra = [a for arg in node_args for a in shlex.split(arg)]
    certs = None
    if tls:
        from kvstore.certs import init

        certs = init(os.path.join(data_dir, "tls"), nodes)
    metrics = {i: f"127.0.0.1:{base_client_port + 2 + 100 * (i - 1)}" for i in range(1, nodes + 1)}
    lc = LocalCluster(data_dir, nodes, base_client_port, base_peer_port, extra_args=extra, certs=certs,
                      metrics_addrs=metrics)
    busy = sorted(lc.data_dirs_in_use().items())
    if busy:
        i, pid = busy[0]
        fail(f"data dir {lc.base_dir} is in use by pid {pid} (member {i}'s node: is another "
             "`kvstore cluster up` running on it?)")
    existing = [i for i in lc.ids if os.path.isdir(lc.data_dir(i))]
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    verb = "restarting on existing data in" if existing else "starting a new cluster in"
    console.print(f"[bold]kvstore[/]: {verb} {lc.base_dir} ({nodes} members)")
    lc.start()
    try:
        t0 = time.monotonic()
        leader = None
        while leader is None and not stopping:
            try:
                lc.check_alive()
            except NodeFailedToStart as e:
                raise click.ClickException(str(e)) from e
            leader = lc.leader()
            if leader is None:
                time.sleep(0.1)
            if time.monotonic() - t0 > 60:
                raise click.ClickException(f"no leader after 60s; see the logs in {lc.base_dir}")
        if not stopping:
            console.print(f"leader elected in {time.monotonic() - t0:.1f}s: member {leader}")
            console.print("endpoints: " + ",".join(lc.endpoints))
            console.print("metrics: " + " ".join(lc.metrics_url(i) for i in lc.ids) + "  (also /health)")
            if certs is not None:
                console.print("TLS: point the CLI at it with\n"
                              f"  export KVSTORE_ENDPOINTS={','.join('https://' + e for e in lc.endpoints)}\n"
                              f"  export KVSTORE_CACERT={certs.ca_cert} KVSTORE_CERT={certs.client_cert} "
                              f"KVSTORE_KEY={certs.client_key}", highlight=False, soft_wrap=True)
            console.print(f"logs: {lc.base_dir}/node<i>.log   try: [cyan]kvstore put hello world && "
                          "kvstore get hello[/]   stop: Ctrl-C")
            watch(lc, stopping)
    except click.ClickException as e:
        err_console.print(f"[bold red]error:[/] {e.message}")
        lc.stop()
        sys.exit(1)
    finally:
        if lc.running():
            with contextlib.suppress(OSError):  # stdout may be gone (a closed pipe): stop them anyway
                console.print("stopping members (leadership handed over first)...")
            lc.stop()
            with contextlib.suppress(OSError):
                console.print("stopped; data kept in " + lc.base_dir)


def status_table(lc) -> Table:
    from rich.table import Table

    t = Table(title="kvstore local cluster", title_justify="left")
    for col in ("member", "endpoint", "role", "term", "leader", "commit", "applied", "snapshot",
                "revision", "wal", "db", "pid"):
        t.add_column(col, justify="right" if col not in ("endpoint", "role") else "left")
    for i, st in lc.statuses(0.5).items():
        pid = str(lc.pid(i) or "-")
        if st is None:
            state = "[red]down[/]" if not lc.is_running(i) else "[yellow]not answering[/]"
            t.add_row(str(i), lc.client_addr(i), state, *["-"] * 8, pid)
            continue
        role = f"[bold green]{st.role}[/]" if st.role == "leader" else st.role
        t.add_row(str(i), lc.client_addr(i), role, str(st.term), str(st.leader_id or "-"), str(st.commit_index),
                  str(st.applied_index), str(st.snapshot_index), str(st.header.revision),
                  human_bytes(st.wal_size), human_bytes(st.db_size), pid)
    return t


def watch(lc, stopping: list) -> None:
    """Refresh the status table until a signal arrives (a plain log of leader changes off a terminal)."""
    if console.is_terminal:
        from rich.live import Live

        with Live(status_table(lc), console=console.real, refresh_per_second=2) as live:
            while not stopping:
                time.sleep(1.0)
                live.update(status_table(lc))
    else:
        console.print(status_table(lc))
        last = None
        while not stopping:
            time.sleep(1.0)
            lead = lc.leader()
            if lead != last:
                console.print(f"{time.strftime('%H:%M:%S')} leader: {lead or 'none'}")
                last = lead


# ------------------------------------------------------------------------------ client commands


@main.command()
@click.argument("key")
@click.argument("value")
@click.option("--prev-kv", is_flag=True, help="print the value it replaced")
@click.option("--lease", "lease_id", default="0", metavar="LEASE_ID",
              help="attach KEY to this lease (hexadecimal, as `lease grant` prints it)")
@click.pass_context
@client_errors
def put(ctx, key: str, value: str, prev_kv: bool, lease_id: str) -> None:
    """Set KEY to VALUE."""
    lease = 0
    if lease_id != "0":
        from kvstore.lease_cli import parse_lease_id

        try:
            lease = parse_lease_id(lease_id)
        except click.BadParameter as e:
            fail(f"--lease: {e.message}")
    with make_client(ctx) as c:
        r = c.put(key, value, prev_kv=prev_kv, lease=lease)
    console.print(f"OK (revision {r.revision})", highlight=False)
    if prev_kv and r.prev_kv is not None:
        console.print(f"previous: {show(r.prev_kv.value)}", highlight=False)


@main.command()
@click.argument("key")
@click.option("--serializable", is_flag=True, help="read locally from any member (may be stale)")
@click.option("--prefix", is_flag=True, help="every key starting with KEY")
@click.option("--rev", default=0, help="as of this revision (0: the latest)")
@write_out_option
@click.pass_context
@client_errors
def get(ctx, key: str, serializable: bool, prefix: bool, rev: int, write_out: str) -> None:
    """Print the value of KEY (exit 1 if missing; -w json prints a document with count 0 instead)."""
    with make_client(ctx) as c:
        if prefix:
            rr = c.range(key, prefix=True, serializable=serializable, revision=rev)
            if write_out == "json":
                click.echo(wo.dumps(wo.kvs_doc(rr.revision, rr.kvs, count=rr.count, more=rr.more)))
                return
            for kv in rr:
                console.print(f"{show(kv.key)}\t{show(kv.value)}", highlight=False)
            return
        r = c.get(key, serializable=serializable, revision=rev)
    if write_out == "json":
        click.echo(wo.dumps(wo.kvs_doc(r.revision, [r.kv] if r.kv is not None else [])))
        return
    if r.value is None:
        fail(f"key {key!r} not found")
    console.print(show(r.value), highlight=False, soft_wrap=True)


@main.command()
@click.argument("revision", type=int)
@click.pass_context
@client_errors
def compact(ctx, revision: int) -> None:
    """Discard the history below REVISION (reads and watches before it are refused)."""
    with make_client(ctx) as c:
        c.compact(revision)
    console.print(f"compacted revision {revision}", highlight=False)


@main.command("watch")
@click.argument("key")
@click.argument("end", required=False)
@click.option("--prefix", is_flag=True, help="every key starting with KEY")
@click.option("--rev", default=0, help="start at this revision (0: from now)")
@click.option("--prev-kv", is_flag=True, help="print each key's previous value too")
@click.pass_context
@client_errors
def watch_cmd(ctx, key: str, end: str | None, prefix: bool, rev: int, prev_kv: bool) -> None:
    """Print every change to KEY (or [KEY, END), or a prefix) until interrupted, as etcdctl does:
    the event type, then the previous key and value (--prev-kv), then the key and value."""
    with make_client(ctx) as c:
        try:
            for ev in c.watch(key, end, prefix=prefix, start_revision=rev, prev_kv=prev_kv):
                lines = [ev.type]
                if ev.prev_kv is not None:
                    lines += [show(ev.prev_kv.key), show(ev.prev_kv.value)]
                lines += [show(ev.key)] + ([show(ev.value)] if ev.type == "PUT" else [])
                click.echo("\n".join(lines))
                sys.stdout.flush()
        except KeyboardInterrupt:
            return


@main.command("del")
@click.argument("key")
@click.argument("end", required=False)
@click.option("--prefix", is_flag=True, help="every key starting with KEY")
@click.pass_context
@client_errors
def delete(ctx, key: str, end: str | None, prefix: bool) -> None:
    """Delete KEY, the range [KEY, END), or a prefix."""
    with make_client(ctx) as c:
        r = c.delete(key, end, prefix=prefix)
    console.print(f"deleted {r.deleted}", highlight=False)


@main.command("range")
@click.argument("start")
@click.argument("end", required=False)
@click.option("--prefix", is_flag=True, help="every key starting with START")
@click.option("--limit", default=0, help="at most this many keys (0: all)")
@click.option("--keys-only", is_flag=True)
@click.option("--count-only", is_flag=True)
@click.option("--serializable", is_flag=True, help="read locally from any member (may be stale)")
@click.option("--rev", default=0, help="as of this revision (0: the latest)")
@write_out_option
@click.pass_context
@client_errors
def range_(ctx, start, end, prefix, limit, keys_only, count_only, serializable, rev: int, write_out: str) -> None:
    """List keys in [START, END) (or with prefix START); END "\\0" means every key >= START."""
    if end == "\\0":
        end = "\0"
    with make_client(ctx) as c:
        r = c.range(start, end, prefix=prefix, limit=limit, keys_only=keys_only, count_only=count_only,
                    serializable=serializable, revision=rev)
    if write_out == "json":
        click.echo(wo.dumps(wo.kvs_doc(r.revision, r.kvs, count=r.count, more=r.more, keys_only=keys_only)))
        return
    if count_only:
        console.print(str(r.count))
        return
    for kv in r:
        console.print(show(kv.key) if keys_only else f"{show(kv.key)}\t{show(kv.value)}", highlight=False)
    if r.more:
        console.print(f"... ({r.count} in all)", highlight=False)


_CMP_OPS = {"=": "==", "==": "==", "!=": "!=", ">": ">", "<": "<"}


def parse_compare(text: str):
    """'value(k) = v', 'version(k) > 3', 'mod(k) < 10', 'create(k) = 0'."""
    from kvstore.client import txn as t

    try:
        target, op, operand = shlex.split(text)
        fn, _, rest = target.partition("(")
        key = rest.rstrip(")")
        makers = {"value": t.value, "version": t.version, "mod": t.mod_revision, "create": t.create_revision}
        tgt = makers[fn](key)
        operand_v = operand if fn == "value" else int(operand)
        op = _CMP_OPS[op]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r}: expected e.g. \"value(KEY) = VALUE\" or \"version(KEY) > 2\"") from None
    return {"==": tgt.__eq__, "!=": tgt.__ne__, ">": tgt.__gt__, "<": tgt.__lt__}[op](operand_v)


def parse_op(text: str):
    """'put K V', 'get K', 'del K'."""
    from kvstore.client import txn as t

    parts = shlex.split(text)
    if len(parts) == 3 and parts[0] == "put":
        return t.put(parts[1], parts[2])
    if len(parts) == 2 and parts[0] == "get":
        return t.get(parts[1])
    if len(parts) == 2 and parts[0] in ("del", "delete"):
        return t.delete(parts[1])
    raise click.BadParameter(f"{text!r}: expected \"put KEY VALUE\", \"get KEY\" or \"del KEY\"")


@main.command()
@click.option("--if", "compares", multiple=True, help='a compare, e.g. "value(k) = v" (repeatable; all must hold)')
@click.option("--then", "then_ops", multiple=True, help='op if all hold: "put K V", "get K", "del K" (repeatable)')
@click.option("--else", "else_ops", multiple=True, help="op otherwise (repeatable)")
@click.pass_context
@client_errors
def txn(ctx, compares, then_ops, else_ops) -> None:
    """Atomically: if every --if holds, run the --then ops, else the --else ops."""
    from kvstore.client.txn import Txn

    t = Txn().when(*[parse_compare(c) for c in compares]).then(*[parse_op(o) for o in then_ops]) \
        .otherwise(*[parse_op(o) for o in else_ops])
    with make_client(ctx) as c:
        r = c.txn(t)
    console.print("SUCCEEDED" if r.succeeded else "FAILED (compare did not hold)", highlight=False)
    for res in r.responses:
        kvs = getattr(res, "kvs", None)
        if kvs is not None:
            for kv in kvs:
                console.print(f"{show(kv.key)}\t{show(kv.value)}", highlight=False)


@main.command()
@write_out_option
@click.pass_context
@client_errors
def status(ctx, write_out: str) -> None:
    """A table of members: role, term, leader, indexes, sizes."""
    from rich.table import Table

    with make_client(ctx, coalesce=True) as c:
        sts = c.status_all(timeout=min(ctx.obj["timeout"], 2.0))
    if write_out == "json":
        click.echo(wo.dumps(wo.status_doc(sts)))
        if all(isinstance(st, Exception) for st in sts.values()):
            sys.exit(1)
        return
    t = Table()
    for col in ("member", "endpoint", "role", "term", "leader", "commit", "applied", "snapshot", "revision",
                "wal", "db"):
        t.add_column(col)
    answered = 0
    for ep, st in sorted(sts.items()):
        if isinstance(st, Exception):
            t.add_row("?", ep, f"[red]{type(st).__name__}[/]", *["-"] * 8)
            continue
        answered += 1
        role = f"[bold green]{st.role}[/]" if st.is_leader else st.role
        t.add_row(str(st.member_id), ep, role, str(st.term), str(st.leader_id or "-"), str(st.commit_index),
                  str(st.applied_index), str(st.snapshot_index), str(st.revision),
                  human_bytes(st.wal_size), human_bytes(st.db_size))
    console.print(t)
    alarms = sorted({e for st in sts.values() if not isinstance(st, Exception) for e in st.errors})
    for e in alarms:
        err_console.print(f"[bold red]alarm:[/] {e}", highlight=False)
    if not answered:
        fail("no member answered")


@main.command()
@write_out_option
@click.pass_context
@client_errors
def members(ctx, write_out: str) -> None:
    """List the members of the cluster."""
    with make_client(ctx) as c:
        ms = c.members()
    if write_out == "json":
        click.echo(wo.dumps(wo.members_doc(ms)))
        return
    for m in ms:
        console.print(f"{m.id}\t{m.name}\tclient={','.join(m.client_urls)}\tpeer={','.join(m.peer_urls)}",
                      highlight=False)


@main.group()
def leader() -> None:
    """Leadership."""


@leader.command("transfer")
@click.option("--to", "target", default=0, help="member id (default: the most up-to-date other member)")
@click.pass_context
@client_errors
def leader_transfer(ctx, target: int) -> None:
    """Hand leadership to another member."""
    with make_client(ctx) as c:
        new = c.transfer_leader(target)
    console.print(f"leader is now member {new}", highlight=False)


@cluster.command("add")
@click.option("--dir", "data_dir", default="./data", show_default=True, help="the data directory of `cluster up`")
@click.option("--base-client-port", default=DEFAULT_BASE_CLIENT_PORT, show_default=True)
@click.option("--base-peer-port", default=DEFAULT_BASE_PEER_PORT, show_default=True)
@click.pass_context
@client_errors
def cluster_add(ctx, data_dir: str, base_client_port: int, base_peer_port: int) -> None:
    """Start one more local member and add it to the running cluster: learner first, then promoted."""
    from kvstore.cluster_add_cli import add_member

    add_member(ctx, data_dir, base_client_port, base_peer_port)


# ------------------------------------------------------------------------------ wal


@main.group()
def wal() -> None:
    """A stopped member's write-ahead log."""


@wal.command("repair")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="the member's data directory (its --data-dir)")
def wal_repair(data_dir: str) -> None:
    """Cut a torn last write the member refuses to start with, and say what was dropped."""
    from kvstore.storage.wal import WalError
    from kvstore.storage.wal_repair import describe, repair

    try:
        dropped = repair(data_dir)
    except (WalError, OSError) as e:
        fail(str(e))
    click.echo("nothing to repair: the WAL opens cleanly" if dropped is None else describe(dropped))


if __name__ == "__main__":
    main()
