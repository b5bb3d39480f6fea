"""The LMDB state machine against a plain-dict model, under random op sequences.

Hypothesis draws sequences of commands (puts, deletes, ranges with
limit/keys_only/count_only, txns with compares and nested txns, batches,
invalid ops), retries of earlier commands with the same client id and seq,
acked_below advances, log-time jumps past the session ttl, leaders whose
clocks read an hour apart, more sessions than the table keeps, leader no-ops,
garbage entries and replays of old indexes. Each step goes to the real
StateMachine and to `Model`, an independent re-statement of the rules; after
every step the answers, the whole key space, the revision, the applied index
and the session table must agree.

The last tests switch exactly-once off in the state machine
(`testing_disable_dedup`) and show that this comparison catches the double
apply of a retried command.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis import event as _event
from hypothesis.errors import InvalidArgument

from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.sessions import decode_answer
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

TTL_MS = 10_000
MAX_PENDING = 3
MAX_SESSIONS = 3
HOUR_MS = 3_600_000
KEYS = [b"a", b"a\x00", b"b", b"c", b"d"]
ENDS = [b"", b"", b"\x00", b"b", b"c", b"e", b"a"]
VALUES = [b"", b"x", b"y", b"zz"]
C = kv_pb2.Compare


# ---------------------------------------------------------------- the model


class Model:
    """The state machine's rules, restated as directly as possible over dicts."""

    def __init__(self):
        self.kv: dict[bytes, tuple[int, int, int, bytes]] = {}
        self.rev = 0
        self.applied = 0
        self.clock = (0, 0, 0)  # log time, term and leader_clock_ms of the last stamped entry
        # client_id -> [last_seen, acked_below, {seq: answer}]
        self.sessions: dict[int, list] = {}

    # -- entries
    def apply(self, index: int, term: int, data: bytes):
        if index <= self.applied:
            return None
        self.applied = index
        if not data:
            return None
        try:
            cmd = command_pb2.Command.FromString(data)
        except Exception:
            return ("error", ErrorCode.INVALID_ARGUMENT)
        log_time, clock_term, mark = self.clock
        stamp = cmd.leader_clock_ms
        if stamp and term != clock_term:  # a new leader: only a new baseline
            self.clock = (log_time, term, stamp)
        elif stamp > mark:  # the same leader: the time between its two stamps
            self.clock = (log_time + stamp - mark, term, stamp)
        now = self.clock[0]
        for cid in [c for c, s in self.sessions.items() if now > s[0] + TTL_MS]:
            del self.sessions[cid]
        rid = cmd.request_id
        invalid = self.invalid(cmd)
        if rid.client_id:
            verdict = self.session_check(rid, now)
            if verdict is not None:
                return verdict
        if invalid:
            answer = ("error", ErrorCode.INVALID_ARGUMENT)
        else:
            answer = self.run(cmd)
        if rid.client_id:
            self.sessions[rid.client_id][2][rid.seq] = answer
        return answer

    def session_check(self, rid, now):
        s = self.sessions.get(rid.client_id)
        if s is None:
            if not (rid.opens_session and rid.seq == 1):
                return ("error", ErrorCode.FAILED_PRECONDITION)  # session expired (or evicted)
            s = [now, 0, {}]
            while len(self.sessions) >= MAX_SESSIONS:  # evict the least recently used
                del self.sessions[min((v[0], c) for c, v in self.sessions.items())[1]]
            self.sessions[rid.client_id] = s
        s[0] = now
        if rid.acked_below > s[1]:
            s[1] = rid.acked_below
            s[2] = {q: a for q, a in s[2].items() if q >= s[1]}
        if rid.seq in s[2]:
            return s[2][rid.seq]
        if rid.seq < s[1]:
            return ("error", ErrorCode.FAILED_PRECONDITION)
        if len(s[2]) >= MAX_PENDING:
            return ("error", ErrorCode.RESOURCE_EXHAUSTED)
        return None

    # -- validation (enumerates the executions a txn branch can take)
    def invalid(self, cmd) -> bool:
        if cmd.request_id.client_id and not cmd.request_id.seq:
            return True
        return any(self.invalid_op(op) for op in cmd.ops)

    def invalid_op(self, op) -> bool:
        kind = op.WhichOneof("request")
        if kind is None:
            return True
        r = getattr(op, kind)
        if kind == "request_txn":
            if any(not c.key for c in r.compare):
                return True
            if any(self.invalid_op(o) for o in [*r.success, *r.failure]):
                return True
            return self.conflicting(r.success) or self.conflicting(r.failure)
        if not r.key:
            return True
        if kind == "request_put" and r.lease < 0:
            return True
        if kind == "request_range" and r.limit < 0:
            return True
        return False

    def executions(self, op):
        """Every possible list of writes ('put', key) / ('del', key, end) of an op."""
        kind = op.WhichOneof("request")
        if kind == "request_put":
            return [[("put", op.request_put.key)]]
        if kind == "request_delete_range":
            d = op.request_delete_range
            return [[("del", d.key, d.range_end)]]
        if kind == "request_txn":
            out = []
            for branch in (op.request_txn.success, op.request_txn.failure):
                for combo in itertools.product(*[self.executions(o) for o in branch]):
                    out.append([w for ws in combo for w in ws])
            return out
        return [[]]

    def conflicting(self, branch) -> bool:
        per_op = [self.executions(o) for o in branch]
        for i, j in itertools.permutations(range(len(branch)), 2):
            for wi in per_op[i]:
                for wj in per_op[j]:
                    for a in wi:
                        for b in wj:
                            if a[0] == "put" and b[0] == "put" and a[1] == b[1]:
                                return True
                            if a[0] == "put" and b[0] == "del" and in_range(a[1], b[1], b[2]):
                                return True
        return False

    # -- execution
    def run(self, cmd):
        res = command_pb2.CommandResult()
        for op in cmd.ops:
            res.responses.append(self.run_op(op, None))
        res.revision = self.rev
        return res

    def run_op(self, op, txn_state):
        kind = op.WhichOneof("request")
        out = kv_pb2.ResponseOp()
        if kind == "request_range":
            out.response_range.CopyFrom(self.range(op.request_range))
            out.response_range.header.revision = self.rev
        elif kind == "request_put":
            p = op.request_put
            rev = self.write_rev(txn_state)
            old = self.kv.get(p.key)
            if old is not None and p.prev_kv:
                out.response_put.prev_kv.CopyFrom(kvpb(p.key, old))
            create = old[0] if old else rev
            self.kv[p.key] = (create, rev, (old[2] if old else 0) + 1, p.value)
            out.response_put.header.revision = self.rev
        elif kind == "request_delete_range":
            d = op.request_delete_range
            hit = [k for k in sorted(self.kv) if in_range(k, d.key, d.range_end)]
            if hit:
                self.write_rev(txn_state)
            for k in hit:
                if d.prev_kv:
                    out.response_delete_range.prev_kvs.append(kvpb(k, self.kv[k]))
                del self.kv[k]
            out.response_delete_range.deleted = len(hit)
            out.response_delete_range.header.revision = self.rev
        else:
            t = op.request_txn
            outer = txn_state is None
            state = {"wrote": False, "rev": self.rev + 1} if outer else txn_state
            ok = all(self.holds(c) for c in t.compare)
            r = out.response_txn
            r.succeeded = ok
            for sub in t.success if ok else t.failure:
                r.responses.append(self.run_op(sub, state))
            if outer:
                if state["wrote"]:
                    self.rev += 1
                stamp(r, self.rev)
        return out

    def write_rev(self, txn_state):
        if txn_state is None:
            self.rev += 1
            return self.rev
        txn_state["wrote"] = True
        return txn_state["rev"]

    def holds(self, c) -> bool:
        rec = self.kv.get(c.key)
        if c.target == C.VALUE:
            if rec is None:
                return False
            actual, expected = rec[3], c.value
        else:
            field = {C.VERSION: 2, C.CREATE: 0, C.MOD: 1}[c.target]
            actual = rec[field] if rec else 0
            expected = {C.VERSION: c.version, C.CREATE: c.create_revision, C.MOD: c.mod_revision}[c.target]
        return {
            C.EQUAL: actual == expected,
            C.NOT_EQUAL: actual != expected,
            C.GREATER: actual > expected,
            C.LESS: actual < expected,
        }[c.result]

    def range(self, r) -> kv_pb2.RangeResponse:
        hit = [k for k in sorted(self.kv) if in_range(k, r.key, r.range_end)]
        resp = kv_pb2.RangeResponse(count=len(hit))
        resp.header.revision = self.rev
        if r.count_only:
            return resp
        shown = hit[: r.limit] if r.limit else hit
        for k in shown:
            kv = kvpb(k, self.kv[k])
            if r.keys_only:
                kv.value = b""
            resp.kvs.append(kv)
        resp.more = len(shown) < len(hit)
        return resp


def in_range(k: bytes, key: bytes, end: bytes) -> bool:
    if not end:
        return k == key
    if end == b"\x00":
        return k >= key
    return key <= k < end


def kvpb(k, rec) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=k, create_revision=rec[0], mod_revision=rec[1], version=rec[2], value=rec[3])


def stamp(txn_resp, rev):
    txn_resp.header.revision = rev
    for r in txn_resp.responses:
        kind = r.WhichOneof("response")
        if kind == "response_txn":
            stamp(r.response_txn, rev)
        else:
            getattr(r, kind).header.revision = rev


# ---------------------------------------------------------------- strategies

keys_ = st.sampled_from(KEYS)
ranges = st.builds(
    lambda k, e, lim, ko, co: kv_pb2.RequestOp(
        request_range=kv_pb2.RangeRequest(key=k, range_end=e, limit=lim, keys_only=ko, count_only=co)
    ),
    keys_, st.sampled_from(ENDS), st.sampled_from([0, 0, 1, 2]), st.booleans(), st.booleans(),
)
puts = st.builds(
    lambda k, v, p: kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v, prev_kv=p)),
    keys_, st.sampled_from(VALUES), st.booleans(),
)
deletes = st.builds(
    lambda k, e, p: kv_pb2.RequestOp(
        request_delete_range=kv_pb2.DeleteRangeRequest(key=k, range_end=e, prev_kv=p)
    ),
    keys_, st.sampled_from(ENDS), st.booleans(),
)
invalid_ops = st.sampled_from([
    kv_pb2.RequestOp(),
    kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"", value=b"v")),
    kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"a", value=b"v", lease=-7)),
    kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"a", limit=-1)),
    kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=b"")),
])


@st.composite
def compares(draw):
    target = draw(st.sampled_from([C.VERSION, C.CREATE, C.MOD, C.VALUE]))
    c = C(key=draw(keys_), target=target, result=draw(st.sampled_from([C.EQUAL, C.GREATER, C.LESS, C.NOT_EQUAL])))
    n = draw(st.integers(0, 6))
    if target == C.VALUE:
        c.value = draw(st.sampled_from(VALUES))
    elif target == C.VERSION:
        c.version = n if n < 4 else 0
    elif target == C.CREATE:
        c.create_revision = n
    elif draw(st.booleans()):  # unset union compares against 0
        c.mod_revision = n
    return c


def txns(children):
    return st.builds(
        lambda cs, s, f: kv_pb2.RequestOp(request_txn=kv_pb2.TxnRequest(compare=cs, success=s, failure=f)),
        st.lists(compares(), max_size=2),
        st.lists(children, max_size=3),
        st.lists(children, max_size=2),
    )


flat_ops = st.one_of(puts, puts, deletes, ranges)
ops = st.one_of(
    puts, puts, puts, deletes, ranges,
    txns(st.one_of(flat_ops, txns(flat_ops))), txns(flat_ops),
    st.one_of(invalid_ops, puts, puts, deletes),  # invalid about 1 op in 28
)

client_cmds = st.tuples(
    st.just("cmd"),
    st.sampled_from([0, 1, 1, 2, 2]),  # client slot; slot 0 = client_id 0
    st.lists(ops, min_size=1, max_size=4),
    st.sampled_from([0, 1, 1000, TTL_MS, TTL_MS + 1]),  # log time advance
    st.sampled_from([0, 0, 0, 1, 3]),  # how far the client advances acked_below
)
retries = st.tuples(st.just("retry"), st.integers(0, 50), st.sampled_from([0, 0, 1, TTL_MS + 1]))
steps = st.one_of(
    client_cmds, client_cmds, client_cmds,
    retries, retries,
    st.tuples(st.just("new_session"), st.sampled_from([1, 2])),
    st.tuples(st.just("noop")),
    st.tuples(st.just("garbage")),
    st.tuples(st.just("replay_old"), st.integers(1, 5)),
    st.tuples(st.just("read"), ranges),
)


# ---------------------------------------------------------------- the harness


def event(what: str) -> None:
    """Label the step for --hypothesis-show-statistics (no-op outside @given)."""
    try:
        _event(what)
    except InvalidArgument:
        pass


def normalize(answer):
    """Answers compare by value; errors by code (their messages are prose)."""
    if isinstance(answer, ApplyError):
        return ("error", answer.code)
    return answer


class Harness:
    def __init__(self, sm: StateMachine):
        self.sm, self.model = sm, Model()
        self.index = 0
        self.now = 1_000
        self.client_ids = {1: 101, 2: 201}
        self.next_seq = {1: 1, 2: 1}
        self.acked = {1: 0, 2: 0}
        self.sent: list[command_pb2.Command] = []  # client commands, for retries
        self.entries: list[tuple[int, int, bytes]] = []

    def step(self, s) -> None:
        kind = s[0]
        if kind == "cmd":
            _, slot, op_list, dt, ack = s
            self.now += dt
            cmd = command_pb2.Command(leader_clock_ms=self.leader_clock(), ops=op_list)
            if slot:
                seq = self.next_seq[slot]
                self.next_seq[slot] += 1
                self.acked[slot] = min(seq, self.acked[slot] + ack)
                cmd.request_id.CopyFrom(
                    kv_pb2.RequestId(
                        client_id=self.client_ids[slot], seq=seq, acked_below=self.acked[slot],
                        opens_session=seq == 1,  # a first attempt, as the client sends it
                    )
                )
                self.sent.append(cmd)
            self.append(cmd.SerializeToString())
        elif kind == "retry":
            if not self.sent:
                return
            cmd = command_pb2.Command()
            cmd.CopyFrom(self.sent[s[1] % len(self.sent)])
            self.now += s[2]
            cmd.leader_clock_ms = self.leader_clock()  # a re-proposal is stamped anew
            cmd.request_id.opens_session = False  # the first attempt may have been applied
            before = self.sm.dump_sessions().get(cmd.request_id.client_id, (0, 0, {}))[2]
            event(f"retry of a stored answer: {cmd.request_id.seq in before}")
            self.append(cmd.SerializeToString())
        elif kind == "new_session":
            slot = s[1]
            self.client_ids[slot] += 1000
            self.next_seq[slot], self.acked[slot] = 1, 0
        elif kind == "noop":
            self.append(b"")
        elif kind == "garbage":
            self.append(b"\x0a\xff\xff")
        elif kind == "replay_old":
            old = self.entries[-s[1]:]
            got = self.sm.apply(old)
            assert got == [None] * len(old)
            assert [self.model.apply(i, t, d) for i, t, d in old] == [None] * len(old)
        elif kind == "read":
            req = s[1].request_range
            assert self.sm.range(req) == self.model.range(req)
        self.check()

    @staticmethod
    def term_of(index: int) -> int:
        return 1 + index // 7

    def leader_clock(self) -> int:
        """What the leader of the next entry stamps: each term's leader reads an hour later."""
        return self.now + HOUR_MS * self.term_of(self.index + 1)

    def append(self, data: bytes) -> None:
        self.index += 1
        entry = (self.index, self.term_of(self.index), data)
        self.entries.append(entry)
        got = self.sm.apply([entry])
        want = self.model.apply(*entry)
        assert normalize(got[0]) == want, f"entry {self.index}: {got[0]} != {want}"
        if isinstance(want, tuple):
            event(f"answer: {want[1].name}")
        elif want is not None:
            txns = [r.response_txn.succeeded for r in want.responses if r.HasField("response_txn")]
            event(f"answer: result, txn succeeded={any(txns)}" if txns else "answer: result")

    def check(self) -> None:
        sm, m = self.sm, self.model
        assert sm.dump() == m.kv
        assert sm.revision == m.rev
        assert sm.applied_index == m.applied
        assert sm.log_time_ms == m.clock[0]
        got = {
            cid: (last, acked, {q: normalize(decode_answer(a)) for q, a in answers.items()})
            for cid, (last, acked, answers) in sm.dump_sessions().items()
        }
        assert got == {cid: tuple(s) for cid, s in m.sessions.items()}


def open_sm(tmp_path_factory) -> StateMachine:
    return StateMachine.open(
        str(tmp_path_factory.mktemp("sm")), 64 << 20, fsync=False,
        session_ttl_ms=TTL_MS, max_pending=MAX_PENDING, max_sessions=MAX_SESSIONS,
    )


def run_steps(sm: StateMachine, step_list) -> None:
    h = Harness(sm)
    try:
        for s in step_list:
            h.step(s)
    finally:
        sm.close()


_settings = settings(
    max_examples=600, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_settings
@given(step_list=st.lists(steps, min_size=5, max_size=80))
def test_state_machine_matches_model(tmp_path_factory, step_list):
    run_steps(open_sm(tmp_path_factory), step_list)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step_list=st.lists(steps, min_size=1, max_size=30), cut=st.integers(1, 30))
def test_batched_apply_and_restart_match_one_by_one(tmp_path_factory, step_list, cut):
    """Applying the same entries in one batch, in two batches across a reopen,
    gives the same answers and the same final state as one by one."""
    one = open_sm(tmp_path_factory)
    h = Harness(one)
    for s in step_list:
        h.step(s)
    entries = h.entries
    state = (one.dump(), one.revision, one.applied_index, one.dump_sessions())
    one.close()

    path = str(tmp_path_factory.mktemp("batched"))
    sm = StateMachine.open(
        path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_pending=MAX_PENDING, max_sessions=MAX_SESSIONS
    )
    first = sm.apply(entries[:cut])
    sm.close()
    sm = StateMachine.open(
        path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_pending=MAX_PENDING, max_sessions=MAX_SESSIONS
    )
    again = sm.apply(entries)  # the first `cut` are a replay: skipped
    assert again[: len(first)] == [None] * len(first)
    assert (sm.dump(), sm.revision, sm.applied_index, sm.dump_sessions()) == state
    sm.close()


# ---------------------------------------------------------------- teeth


def _disable_dedup(sm: StateMachine) -> StateMachine:
    sm.testing_disable_dedup = True
    return sm


def test_model_catches_double_applied_retry_scripted(tmp_path_factory):
    put = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"a", value=b"x"))
    script = [("cmd", 1, [put], 0, 0), ("retry", 0, 0)]
    run_steps(open_sm(tmp_path_factory), script)  # passes with dedup on
    with pytest.raises(AssertionError):
        run_steps(_disable_dedup(open_sm(tmp_path_factory)), script)


def test_model_catches_double_applied_retry_random(tmp_path_factory):
    """Hypothesis itself finds a counterexample once dedup is switched off."""

    @settings(max_examples=500, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(step_list=st.lists(steps, min_size=1, max_size=40))
    def broken(step_list):
        run_steps(_disable_dedup(open_sm(tmp_path_factory)), step_list)

    with pytest.raises(AssertionError):
        broken()


def _log_time_from_absolute_stamps(sm: StateMachine) -> StateMachine:
    sm.testing_log_time_from_absolute_stamps = True
    return sm


def test_model_catches_log_time_following_a_leaders_clock(tmp_path_factory):
    """The next term's leader reads an hour ahead: following its clock expires client 1."""
    put = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"a", value=b"x"))
    script = [("cmd", 1, [put], 0, 0)] + [("cmd", 0, [put], 1, 0)] * 7
    run_steps(open_sm(tmp_path_factory), script)  # passes with the log clock
    with pytest.raises(AssertionError):
        run_steps(_log_time_from_absolute_stamps(open_sm(tmp_path_factory)), script)
