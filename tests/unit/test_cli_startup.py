"""`kvstore serve` starts a node without loading what only the other commands need.

A node's restart time is part of the performance goals: rich, the client
library, the Jepsen harness and the bench must not be imported on its path,
nor prometheus_client (~60 ms) unless the node serves --listen-metrics-addr.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

from kvstore import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("rich", "kvstore.client", "kvstore.jepsen", "kvstore.bench", "prometheus_client")


def loaded_after(code: str) -> set[str]:
    """Top-level names of the HEAVY modules (plus kvstore.server.main) loaded by a fresh interpreter running code."""
    script = textwrap.dedent(f"""
        import atexit, sys
        sys.path.insert(0, {ROOT!r})
        watch = {HEAVY + ("kvstore.server.main",)!r}
        atexit.register(lambda: print("LOADED", sorted({{w for w in watch for m in list(sys.modules)
                                                         if m == w or m.startswith(w + ".")}})))
    """) + code
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LOADED")]
    assert line, r.stdout + r.stderr
    return set(eval(line[0][len("LOADED "):]))


def test_importing_the_cli_loads_none_of_the_heavy_modules():
    assert loaded_after("import kvstore.cli") == set()


def test_kvstore_serve_reaches_the_node_without_them():
    loaded = loaded_after("from kvstore.cli import main\nmain(['serve', '--help'])")
    assert "kvstore.server.main" in loaded  # teeth: the serve path really ran
    assert loaded & set(HEAVY) == set()


def test_a_client_command_does_load_rich():
    """Teeth for the two tests above: the check sees rich when a command uses it."""
    loaded = loaded_after("from kvstore.cli import fail\ntry:\n    fail('x')\nexcept SystemExit:\n    pass")
    assert "rich" in loaded


def test_lazy_subcommands_are_listed_and_resolve():
    out = CliRunner().invoke(cli.main, ["--help"]).output
    assert "bench" in out and "jepsen" in out and "serve" in out
    ctx = cli.main.make_context("kvstore", ["bench", "--help"], resilient_parsing=True)
    for name in ("bench", "jepsen"):
        assert isinstance(cli.main.get_command(ctx, name), click.Command)
    assert cli.main.get_command(ctx, "no-such-command") is None
    assert "--clients" in CliRunner().invoke(cli.main, ["bench", "--help"]).output


def test_fail_prints_one_line_on_stderr(capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("boom", code=3)
    assert e.value.code == 3
    assert "error: boom" in capsys.readouterr().err
