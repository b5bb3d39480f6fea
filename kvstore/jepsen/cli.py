"""``kvstore jepsen``: run a test, check a history, clean up after a crashed run.

Exit codes are verdicts: 0 valid, 1 not valid, 2 unknown (the run or the
check could not finish).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from kvstore.jepsen.runner import INVALID, UNKNOWN, VALID


@click.group("jepsen")
def jepsen() -> None:
    """Jepsen-style tests: real faults against a real cluster, a checked history."""


@jepsen.command("run")
@click.option("--nodes", default=3, show_default=True, help="cluster size")
@click.option("--time", "time_", default=60.0, show_default=True, help="seconds of workload under faults")
@click.option("--nemesis", default="partition", show_default=True,
              help="comma-separated fault windows taking turns; '+' joins faults in one window. "
                   "partition[-halves|-leader|-ring|-bridge], kill[-random|-leader], "
                   "pause[-random|-leader], power[-random|-leader|-all] (root: loop-mounted ext4), "
                   "clock[-{leader,random}-{ahead,behind}], none")
@click.option("--workload", type=click.Choice(["register", "set", "bank", "watch", "lease", "lock", "lock-unfenced"]),
              default="register",
              show_default=True)
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="parent directory of the run directory")
@click.option("--concurrency", default=0, help="client workers (default: 2 per node)")
@click.option("--rate", default=100.0, show_default=True, help="total ops/s cap (0: as fast as possible)")
@click.option("--fault-seconds", default=5.0, show_default=True)
@click.option("--heal-seconds", default=5.0, show_default=True)
@click.option("--op-timeout", default=1.0, show_default=True,
              help="seconds a call may take (retries included) before its outcome is unknown")
@click.option("--network", type=click.Choice(["auto", "netns", "proxy"]), default="auto", show_default=True,
              help="netns: namespaces + iptables (root); proxy: TCP proxies that reset links")
@click.option("--seed", type=int, default=None)
@click.option("--server-arg", "server_args", multiple=True,
              help="extra flag for every node, e.g. --server-arg=--testing-unsafe-local-reads")
@click.option("--keep-data", is_flag=True, help="keep the nodes' data directories in the run directory")
@click.option("--name", default="", help="run directory name (default: time-workload-nemesis)")
@click.option("--tls", is_flag=True, help="TLS for clients (client certificates) and peers (mutual)")
@click.option("--auth", is_flag=True, help="enable auth; the workload runs as a non-root user")
def run_command(nodes: int, time_: float, nemesis: str, workload: str, out: str, concurrency: int,
                rate: float, fault_seconds: float, heal_seconds: float, op_timeout: float,
                network: str, seed: int | None, server_args: tuple[str, ...], keep_data: bool,
                name: str, tls: bool, auth: bool) -> None:
    """Start a cluster, run WORKLOAD under NEMESIS for TIME seconds, heal, check."""
    from kvstore.jepsen.nemesis import parse_spec
    from kvstore.jepsen.runner import RunConfig, run

    try:
        parse_spec(nemesis)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--nemesis") from None
    config = RunConfig(nodes=nodes, time=time_, nemesis=nemesis, workload=workload, out=out,
                       concurrency=concurrency, rate=rate, fault_seconds=fault_seconds,
                       heal_seconds=heal_seconds, op_timeout=op_timeout, network=network, seed=seed,
                       server_args=list(server_args), keep_data=keep_data, name=name, tls=tls,
                       auth=auth)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every finally runs:
    # nodes stopped, namespaces removed. Only SIGKILL needs `kvstore jepsen cleanup`.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run(config)
    except Exception as error:  # the run itself failed: no verdict
        click.echo(f"run failed: {error}", err=True)
        sys.exit(UNKNOWN)
    s = result.summary
    click.echo(f"{result.run_dir}")
    click.echo(f"  ops {s['ops']['total']}: {s['ops']['ok']} ok, {s['ops']['fail']} fail, "
               f"{s['ops']['info']} info; faults {s['faults_injected']} {s['faults_by_kind']}; "
               f"leader changes {s['leader_changes']}")
    click.echo(f"  {'VALID' if result.verdict.valid else 'NOT VALID'}: {result.verdict.summary}")
    click.echo(f"  report: {result.run_dir / 'report.html'}")
    sys.exit(result.exit_code)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@jepsen.command("check")
@click.argument("history", type=click.Path(exists=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="print the verdict as JSON")
def check_command(history: str, as_json: bool) -> None:
    """Check a history (a run directory or a history file: JSONL, etcd log, EDN).

    Register histories go to the linearizability checker; set and bank
    histories to their own checkers.
    """
    path = Path(history)
    if path.is_dir():
        path = path / "history.jsonl"
    try:
        code, text, details = _check(path)
    except Exception as error:
        click.echo(f"cannot check {path}: {error}", err=True)
        sys.exit(UNKNOWN)
    if as_json:
        click.echo(json.dumps({"valid": code == VALID, "summary": text, **details}, default=str, indent=2))
    else:
        click.echo(text)
    sys.exit(code)


def _check(path: Path) -> tuple[int, str, dict]:
    """(exit code, text, details) for one history file."""
    from kvstore.jepsen.checker import check_file
    from kvstore.jepsen.parsers import JSONL, detect_format

    if detect_format(path) == JSONL:
        from kvstore.jepsen.history import load_jsonl
        from kvstore.jepsen.workloads import BankWorkload, check_bank, check_set, check_watch, workload_of

        ops = load_jsonl(path)
        kind = workload_of(ops)
        verdict = None
        if kind == "set":
            verdict = check_set(ops)
        elif kind == "watch":
            verdict = check_watch(ops)
        elif kind == "bank":
            bank = BankWorkload()  # the run's accounts and total are the workload's fixed ones
            verdict = check_bank(ops, bank.accounts, bank.total)
        elif kind == "lock":
            from kvstore.jepsen.lock_workload import check_lock

            verdict = check_lock(ops)
        elif kind == "lease":
            from kvstore.jepsen.lease_workload import check_leases

            # the run's election timeout and leader changes are in its summary.json, when there is one
            summary_path = path.parent / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            verdict = check_leases(ops, summary.get("election_s", 0.5),
                                   [entry["time"] for entry in summary.get("leaders", [])])
        if verdict is not None:
            code = UNKNOWN if verdict.unknown else VALID if verdict.valid else INVALID
            return code, f"{kind}: {verdict.summary}", verdict.details
    result = check_file(path)
    return VALID if result.ok else INVALID, result.explain(40), {"model": result.model_name}


@jepsen.command("cleanup")
def cleanup_command() -> None:
    """Remove every namespace, link, rule and disk a harness run made (names start with kvj-)."""
    from kvstore.jepsen import disk, net

    why = net.netns_supported()
    if why:
        click.echo(f"nothing to clean: {why}")
        return
    removed = net.cleanup() + disk.cleanup()
    for thing in removed:
        click.echo(f"removed {thing}")
    click.echo(f"{len(removed)} removed" if removed else "nothing left behind")


@jepsen.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_command(run_dir: str) -> None:
    """Re-render report.html of a run directory."""
    from kvstore.jepsen.report import write_report

    click.echo(write_report(run_dir))


def main() -> None:
    jepsen(prog_name="kvstore jepsen")


if __name__ == "__main__":
    main()
