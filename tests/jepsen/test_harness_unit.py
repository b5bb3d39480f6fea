"""The harness without a cluster: nemesis shapes and schedule, workloads and their
checkers against an in-memory store (correct and deliberately broken), the
recorder, the report, the TCP proxy and the ``check`` command."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvstore.jepsen import nemesis as nem
from kvstore.jepsen.cli import jepsen
from kvstore.jepsen.history import FAIL, INFO, OK, load_jsonl
from kvstore.jepsen.proxy import ProxyNetwork
from kvstore.jepsen.recorder import Recorder, load_faults
from kvstore.jepsen.report import write_report
from kvstore.jepsen.runner import (_final_reads, _invoke, _worker, outcome_of, summarize,
                                   write_results, RunConfig)
from kvstore.jepsen.workloads import (BankWorkload, Op, RegisterWorkload, SetWorkload, check_set,
                                      make_workload)


# ------------------------------------------------------------------ nemesis

def cut_pairs(grudge: dict[int, set[int]]) -> set[frozenset[int]]:
    return {frozenset((a, b)) for a, bs in grudge.items() for b in bs}


def test_partition_shapes_are_symmetric_and_what_they_say() -> None:
    rng = random.Random(7)
    five = [1, 2, 3, 4, 5]
    components = nem.halves(five, rng)
    assert sorted(len(c) for c in components) == [2, 3]
    grudge = nem.grudge_of(components)
    assert all(a in grudge[b] for a, bs in grudge.items() for b in bs), "grudges must be symmetric"
    assert len(cut_pairs(grudge)) == 6

    assert nem.grudge_of(nem.isolate(2, [1, 2, 3])) == {2: {1, 3}, 1: {2}, 3: {2}}

    grudge, middle = nem.bridge([1, 2, 3], rng)
    assert grudge[middle] == set() and len(cut_pairs(grudge)) == 1

    ring = nem.majority_ring(five, rng)
    seen = {n: frozenset(five) - ring[n] for n in five}
    assert all(len(s) == 3 for s in seen.values()), "each node sees a majority (itself + 2)"
    assert len(set(seen.values())) == 5, "no two nodes see the same majority"
    assert all(a in ring[b] for a, bs in ring.items() for b in bs)


def test_parse_spec() -> None:
    windows = nem.parse_spec("partition,kill+pause")
    assert [[p.name for p in w] for w in windows] == [["partition"], ["kill", "pause"]]
    assert nem.parse_spec("none") == []
    with pytest.raises(ValueError, match="unknown nemesis"):
        nem.parse_spec("flood")


def test_clock_packages_skew_the_chosen_node_and_put_it_back(tmp_path: Path) -> None:
    from kvstore.jepsen.clock import NodeClocks, compiler, uses_clock

    windows = nem.parse_spec("clock,partition+clock-random-behind")
    assert [[p.name for p in w] for w in windows] == [["clock"], ["partition", "clock-random-behind"]]
    assert uses_clock("kill,partition+clock-leader-ahead") and not uses_clock("kill,pause")
    with pytest.raises(ValueError, match="unknown nemesis 'clock-sideways'"):
        nem.parse_spec("clock-sideways")
    if compiler() is None:
        pytest.skip("no C compiler to build the clock shim")
    clocks = NodeClocks(tmp_path, [1, 2, 3])
    assert clocks.env(2)["KVSTORE_CLOCK_SKEW_FILE"] == str(tmp_path / "node2.skew")
    assert Path(clocks.env(2)["LD_PRELOAD"]).exists()

    class ClockControl(FakeControl):
        def skew_clock(self, node: int, seconds: int) -> None:
            clocks.set(node, seconds)

    ctl, rotation = ClockControl(), windows[0][0]
    first = rotation.inject(ctl, random.Random(1))  # the leader (n2) an hour ahead
    assert first.nodes == [2] and "leader n2" in first.description
    assert (tmp_path / "node2.skew").read_text() == "+3600\n"
    first.undo()
    assert (tmp_path / "node2.skew").read_text() == "+0\n"
    second = rotation.inject(ctl, random.Random(1))  # a random node an hour behind
    assert clocks.offsets[second.nodes[0]] == -3600
    second.undo()
    assert set(clocks.offsets.values()) == {0}
    with pytest.raises(RuntimeError, match="not started for the clock nemesis"):
        rotation.inject(FakeControl(), random.Random(1))


class FakeControl:
    def __init__(self) -> None:
        self.nodes = [1, 2, 3]
        self.actions: list[str] = []
        self.grudge: dict[int, set[int]] = {}

    def leader(self) -> int | None:
        return 2

    def kill(self, node: int) -> None:
        self.actions.append(f"kill {node}")

    def restart(self, node: int) -> None:
        self.actions.append(f"restart {node}")

    def pause(self, node: int) -> None:
        self.actions.append(f"pause {node}")

    def resume(self, node: int) -> None:
        self.actions.append(f"resume {node}")

    def partition(self, grudge: dict[int, set[int]]) -> None:
        self.grudge = grudge
        self.actions.append("partition")

    def heal_network(self) -> None:
        self.grudge = {}
        self.actions.append("heal")


def test_nemesis_schedule_injects_and_always_heals() -> None:
    ctl = FakeControl()
    recorder = Recorder()
    schedule = nem.Nemesis(ctl, nem.parse_spec("partition-leader,kill-leader+pause-random"), recorder,
                           fault_seconds=0.15, heal_seconds=0.05, seed=1)
    schedule.start()
    deadline = time.monotonic() + 10
    while len(recorder.faults) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    schedule.stop()
    assert len(recorder.faults) >= 4
    assert all(f.end is not None and f.end >= f.start for f in recorder.faults), "every window closed"
    first = recorder.faults[0]
    assert first.kind == "partition" and "isolate leader n2" in first.description and first.nodes == [1, 2, 3]
    assert {f.kind for f in recorder.faults} >= {"partition", "kill", "pause"}
    assert ctl.actions.count("kill 2") == ctl.actions.count("restart 2") >= 1
    assert ctl.actions.count("partition") == ctl.actions.count("heal")
    assert ctl.grudge == {}


# --------------------------------------------------------------- workloads

class MemoryStore:
    """An in-memory Store; ``stale`` > 0 makes reads sometimes return an old value,
    ``lose`` > 0 makes acknowledged puts sometimes vanish, ``split`` makes swaps non-atomic."""

    def __init__(self, seed: int = 0, stale: float = 0.0, lose: float = 0.0, split: bool = False) -> None:
        self.data: dict[str, str] = {}
        self.old: dict[str, str | None] = {}
        self.rng = random.Random(seed)
        self.stale, self.lose, self.split = stale, lose, split

    async def _tick(self) -> None:
        await asyncio.sleep(self.rng.random() * 0.002)

    async def get(self, key: str) -> str | None:
        await self._tick()
        if key in self.old and self.rng.random() < self.stale:
            return self.old[key]
        return self.data.get(key)

    def _set(self, key: str, value: str) -> None:
        self.old[key] = self.data.get(key)
        if self.rng.random() >= self.lose:
            self.data[key] = value

    async def put(self, key: str, value: str) -> None:
        await self._tick()
        self._set(key, value)

    async def cas(self, key: str, expected: str, new: str) -> bool:
        await self._tick()
        if self.data.get(key) != expected:
            return False
        self._set(key, new)
        return True

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        await self._tick()
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    async def swap(self, expected: dict[str, str], new: dict[str, str]) -> bool:
        await self._tick()
        if any(self.data.get(k) != v for k, v in expected.items()):
            return False
        for i, (k, v) in enumerate(new.items()):
            self.data[k] = v
            if self.split and i == 0:
                await asyncio.sleep(0.001)  # a reader can see half a transfer
        return True

    def outcome_of(self, error: BaseException, mutation: bool) -> str:
        return INFO if mutation else FAIL


def drive(workload, store, seconds: float = 0.6, workers: int = 4) -> Recorder:
    """What the runner does, minus the cluster: workers until the deadline, then final reads."""
    recorder = Recorder()

    async def main() -> None:
        await workload.setup(store)
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_worker(s, workers, workload, store, recorder, deadline, 0.0,
                                       random.Random(s), 5.0) for s in range(workers)))
        await _final_reads(workload, store, recorder, 1000)
    asyncio.run(main())
    return recorder


def test_register_valid_on_a_correct_store_and_caught_on_stale_reads() -> None:
    good = RegisterWorkload(seed=1, ops_per_key=60)
    recorder = drive(good, MemoryStore(1))
    counts = recorder.outcome_counts()
    assert counts["ok"] > 100 and counts["fail"] > 0, counts  # cas misses are real fails
    assert len(good.used) > 3, "keys are rotated"
    assert good.check(recorder.events).valid

    bad = RegisterWorkload(seed=1, ops_per_key=60)
    verdict = bad.check(drive(bad, MemoryStore(1, stale=0.3)).events)
    assert not verdict.valid and verdict.details["nonlinearizable_keys"]
    assert "NOT linearizable" in verdict.details["explanation"]


def test_cas_refused_without_being_applied_is_not_a_failed_compare() -> None:
    """During an election every attempt of a cas can meet "no leader" (not applied) until
    its deadline: the client raises with maybe_applied=False. The cas certainly did
    not happen, but a cas ``fail`` in the history says "the compare did not match",
    and here the register did hold the expected value: recorded as ``fail``, a
    correct store was judged NOT linearizable. It must be ``info``."""
    from kvstore.client import errors

    class NoLeaderForCas(MemoryStore):
        async def cas(self, key: str, expected: str, new: str) -> bool:
            raise errors.DeadlineExceeded(12, {"n1:2379": "UNAVAILABLE: no leader"}, timeout=0.5,
                                          maybe_applied=False)

        def outcome_of(self, error: BaseException, mutation: bool) -> str:
            return outcome_of(error, mutation)  # the real runner's classification

    workload, store, recorder = RegisterWorkload(seed=1), NoLeaderForCas(1), Recorder()

    async def main() -> list[str]:
        return [await _invoke(workload, store, recorder, process, op, 5.0) for process, op in
                enumerate([Op("write", 0, 2), Op("cas", 0, [2, 1]), Op("read", 0)])]
    assert asyncio.run(main()) == [OK, INFO, OK]
    # A refused write is still a plain fail (it did not happen), as is a refused read.
    assert outcome_of(errors.NoEndpointAnswered(3, {}, maybe_applied=False), mutation=True) == FAIL
    verdict = workload.check(recorder.events)
    assert verdict.valid, verdict.details["explanation"]


def test_set_reports_lost_elements() -> None:
    good = SetWorkload(seed=2)
    verdict = good.check(drive(good, MemoryStore(2)).events)
    assert verdict.valid, verdict
    assert verdict.details["acknowledged"] > 20 and verdict.details["lost"] == []

    bad = SetWorkload(seed=2)
    verdict = bad.check(drive(bad, MemoryStore(2, lose=0.2)).events)
    assert not verdict.valid and verdict.details["lost"]


def test_set_checker_duplicates_and_unexpected() -> None:
    recorder = Recorder()
    for element, outcome in ((0, OK), (1, INFO), (2, FAIL)):
        recorder.invoke(element, "add", None, element)
        recorder.complete(element, outcome, element)
    recorder.invoke(9, "read")
    recorder.complete(9, OK, [0, 0, 1, 7])
    verdict = check_set(load_ops(recorder))
    assert not verdict.valid
    assert verdict.details["duplicated"] == [0] and verdict.details["unexpected"] == [7]
    assert verdict.details["recovered_unknown"] == 1 and verdict.details["lost"] == []


def load_ops(recorder: Recorder):
    from kvstore.jepsen.history import pair_events
    return pair_events(recorder.events)


def test_bank_conserves_and_catches_torn_transfers() -> None:
    good = BankWorkload(seed=3)
    recorder = drive(good, MemoryStore(3))
    verdict = good.check(recorder.events)
    assert verdict.valid, verdict
    assert sum(json.loads(json.dumps(verdict.details["final"])).values()) == good.total
    transfers = [e for e in recorder.events if e.f == "transfer" and e.type == OK]
    assert len(transfers) > 20

    bad = BankWorkload(seed=3)
    verdict = bad.check(drive(bad, MemoryStore(3, split=True)).events)
    assert not verdict.valid and verdict.details["bad_reads"] > 0


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("queue")


# ------------------------------------------------------ recorder and report

def test_recorder_writes_the_checkers_schema(tmp_path: Path) -> None:
    with Recorder(tmp_path / "history.jsonl", tmp_path / "faults.jsonl") as recorder:
        recorder.invoke(0, "cas", 1, [1, 2])
        with pytest.raises(RuntimeError):
            recorder.invoke(0, "read", 1)
        recorder.complete(0, FAIL, [1, 2])
        recorder.invoke(1, "write", 1, 3)  # never completes: an info operation
        fault = recorder.fault_started("kill", "kill -9 n1", [1])
        recorder.fault_ended(fault)
    ops = load_jsonl(tmp_path / "history.jsonl")
    assert [(o.f, o.key, o.value, o.outcome) for o in ops] == [("cas", 1, (1, 2), FAIL),
                                                              ("write", 1, 3, INFO)]
    assert [(f.kind, f.end is not None) for f in load_faults(tmp_path / "faults.jsonl")] == [("kill", True)]
    line = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])
    assert set(line) == {"process", "type", "f", "key", "value", "time"}


def test_report_is_self_contained(tmp_path: Path) -> None:
    workload = RegisterWorkload(seed=4)
    recorder = drive(workload, MemoryStore(4), seconds=0.3)
    recorder._history = open(tmp_path / "history.jsonl", "w")
    for event in recorder.events:
        recorder._history.write(event.to_json() + "\n")
    fault = recorder.fault_started("partition", "isolate leader n1: n1 -x- n2, n1 -x- n3", [1, 2, 3])
    recorder.fault_ended(fault)
    recorder.close()
    (tmp_path / "faults.jsonl").write_text(json.dumps({"phase": "start", **fault.__dict__}) + "\n")
    from kvstore.jepsen.runner import LeaderWatch
    watch = LeaderWatch({}, recorder.clock)
    verdict = workload.check(recorder.events)
    summary = summarize(RunConfig(time=0.3), "proxy", recorder, watch, verdict, {"total": 1.0}, [])
    write_results(tmp_path, verdict, summary)
    html = write_report(tmp_path).read_text()
    assert "<svg" in html and "isolate leader n1" in html and "VALID" in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', ""), "no network references"
    assert html.count('class="op ok"') >= summary["ops"]["ok"]


# ------------------------------------------------------------------- proxy

def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return server, port


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1024):
                conn.sendall(data)
        except OSError:
            pass


def test_proxy_resets_during_a_partition_and_never_drops_bytes() -> None:
    with ProxyNetwork([1, 2]) as network:
        server, port = echo_server()
        link = network.links[(1, 2)]
        link.target = ("127.0.0.1", port)

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", link.port), timeout=5)

        held = connect()
        payload = bytes(range(256)) * 400  # 100 KiB arrives whole and in order
        held.sendall(payload)
        received = b""
        while len(received) < len(payload):
            received += held.recv(65536)
        assert received == payload

        network.partition({2: {1}})  # either side's grudge cuts the link
        assert link.blocked and network.links[(2, 1)].blocked
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(50):  # the held connection is reset, not stalled
                held.sendall(b"x")
                if not held.recv(1):
                    raise ConnectionResetError("closed")
                time.sleep(0.01)
        # A new connection is accepted and reset at once: a refusal the caller sees
        # (at connect, at the first send or at the first receive, as timing has it).
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            fresh = connect()
            try:
                fresh.sendall(b"y")
                if not fresh.recv(1):
                    raise ConnectionResetError("closed")
            finally:
                fresh.close()
        assert link.refused >= 1

        network.heal()
        again = connect()
        again.sendall(b"back")
        assert again.recv(4) == b"back"
        for sock in (held, again, server):
            sock.close()
        assert network.peer_addrs_for(1)[2] == f"127.0.0.1:{link.port}"


# -------------------------------------------------------------------- cli

def test_check_command_exit_code_is_the_verdict(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(e) for e in [
        {"process": 0, "type": "invoke", "f": "write", "key": "a", "value": 1, "time": 1},
        {"process": 0, "type": "ok", "f": "write", "key": "a", "value": 1, "time": 2},
        {"process": 1, "type": "invoke", "f": "read", "key": "a", "value": None, "time": 3},
        {"process": 1, "type": "ok", "f": "read", "key": "a", "value": 1, "time": 4}]) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().replace('"value": 1, "time": 4', '"value": 2, "time": 4'))
    runner = CliRunner()
    assert runner.invoke(jepsen, ["check", str(good)]).exit_code == 0
    result = runner.invoke(jepsen, ["check", str(bad)])
    assert result.exit_code == 1 and "NOT linearizable" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert runner.invoke(jepsen, ["check", str(broken)]).exit_code == 2

    sets = tmp_path / "set.jsonl"
    sets.write_text("\n".join(json.dumps(e) for e in [
        {"process": 0, "type": "invoke", "f": "add", "value": 5, "time": 1},
        {"process": 0, "type": "ok", "f": "add", "value": 5, "time": 2},
        {"process": 1, "type": "invoke", "f": "read", "value": None, "time": 3},
        {"process": 1, "type": "ok", "f": "read", "value": [], "time": 4}]) + "\n")
    result = runner.invoke(jepsen, ["check", str(sets)])
    assert result.exit_code == 1 and "1 lost" in result.output
