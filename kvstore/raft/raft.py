"""The Raft state machine: roles, terms, votes, replication, reads, transfer.

Pure: it is driven by `tick()` and `step(message)`, reads its durable log
through Storage, and leaves its outputs (messages, read states, log changes)
in fields that RawNode packages into a Ready. Structured like etcd's raft.go.
"""
from __future__ import annotations

import random

from . import faults
from .config import Config
from .confchange import decode_conf_change, encode_conf_change
from .errors import ConfChangeRefused, ProposalDropped
from .log import RaftLog
from .progress import ProgressState, ProgressTracker, VoteResult
from .read_only import ReadOnly
from .storage import CompactedError, SnapshotTemporarilyUnavailable, Storage
from .types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType as MT,
    ReadState,
    Snapshot,
    StateRole,
)
from .util import entry_size

# context of a VOTE sent because of TIMEOUT_NOW: overrides the leader lease (thesis §3.10)
CAMPAIGN_TRANSFER = b"CampaignTransfer"

# messages that only a leader sends, or that change no durable state:
# they may leave before this node's own fsync (thesis §10.2.1)
_SEND_NOW = frozenset({MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT, MT.TIMEOUT_NOW, MT.READ_INDEX_RESP,
                       MT.PRE_VOTE, MT.PRE_VOTE_RESP, MT.HEARTBEAT_RESP, MT.READ_INDEX, MT.TRANSFER_LEADER})


class Raft:
    def __init__(self, cfg: Config, storage: Storage) -> None:
        cfg.validate()
        self.id = cfg.id
        self.cfg = cfg
        self.rand = cfg.rand if cfg.rand is not None else random.Random()
        self.log = RaftLog(storage)
        self.max_msg_size = cfg.max_size_per_msg
        self.max_uncommitted = cfg.max_uncommitted_size
        self.election_timeout = cfg.election_tick
        self.heartbeat_timeout = cfg.heartbeat_tick
        self.pre_vote = cfg.pre_vote
        self.check_quorum = cfg.check_quorum
        bugs = cfg.testing_bugs
        self.bug_commit_old_term = faults.COMMIT_OLD_TERM in bugs
        self.bug_vote_no_log_check = faults.VOTE_WITHOUT_LOG_CHECK in bugs
        self.bug_vote_before_persist = faults.VOTE_BEFORE_PERSIST in bugs
        self.bug_read_no_heartbeat = faults.READ_WITHOUT_HEARTBEAT in bugs
        self.bug_two_conf_changes = faults.TWO_CONF_CHANGES_IN_FLIGHT in bugs
        self.max_learner_lag = cfg.max_learner_lag

        hs, cs = storage.initial_state()
        if cfg.conf_state is not None and cfg.conf_state.voters:
            cs = cfg.conf_state  # the state machine's: newer than the snapshot's when changes were applied since
        self.tracker = ProgressTracker(cfg.max_inflight_msgs, bug_learner_in_quorum=faults.LEARNER_IN_QUORUM in bugs)
        voters = cs.voters if cs.voters else cfg.peers
        if not voters:
            raise ValueError("no voters: give Config.peers for a new cluster")
        nxt = self.log.last_index() + 1
        for v in voters:
            self.tracker.add_node(v, nxt)
        for v in cs.learners:
            self.tracker.add_node(v, nxt, learner=True)

        self.term = hs.term
        self.vote = hs.vote
        commit = max(hs.commit, cfg.applied)
        if commit > self.log.last_index():
            # the durable log lost entries that were committed (or applied): never guess
            raise ValueError(f"storage is inconsistent: commit/applied {commit} beyond last index "
                             f"{self.log.last_index()}")
        self.log.commit_to(commit)
        if cfg.applied:
            self.log.applied_to(cfg.applied)

        self.state = StateRole.FOLLOWER
        self.lead = 0
        self.msgs: list[Message] = []
        # the commit index moved and followers should hear of it: sent once per Ready (take_messages)
        self.commit_news = False
        self.read_states: list[ReadState] = []
        self.read_only = ReadOnly()
        self.pending_reads: list[Message] = []  # wait for the first commit of this term (§6.4)
        self.lead_transferee = 0
        self.campaign_transfer = False  # the current campaign was started by TIMEOUT_NOW
        self.pending_conf_index = 0
        # a leader that applied its own removal: it leads on (not counting itself) until the rest hold its log
        self.stepping_down = False
        self.uncommitted_size = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout
        self.become_follower(self.term, 0)

    # -- state snapshots for Ready ------------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def promotable(self) -> bool:
        pr = self.tracker.progress.get(self.id)
        return pr is not None and not pr.is_learner

    # -- sending --------------------------------------------------------------------------

    def send(self, m: Message) -> None:
        m.frm = self.id
        if m.term == 0 and m.type not in (MT.READ_INDEX, MT.TRANSFER_LEADER):
            m.term = self.term
        self.msgs.append(m)

    def take_messages(self) -> tuple[list[Message], list[Message]]:
        """Split the outbox into (send now, send after this Ready is durable)."""
        if self.commit_news:
            self._send_commit_news()
        now: list[Message] = []
        later: list[Message] = []
        vote_now = self.bug_vote_before_persist
        for m in self.msgs:
            if m.type in _SEND_NOW or (vote_now and m.type == MT.VOTE_RESP):
                now.append(m)
            else:
                later.append(m)
        self.msgs = []
        return now, later

    def maybe_send_append(self, to: int, send_if_empty: bool = True) -> bool:
        pr = self.tracker.progress[to]
        if pr.is_paused():
            return False
        log = self.log
        prev = pr.next - 1
        try:
            prev_term = log.term(prev)
            ents = log.entries(pr.next, log.last_index() + 1, self.max_msg_size)
        except CompactedError:
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self.send(Message(MT.APPEND, to=to, index=prev, log_term=prev_term, entries=ents, commit=log.committed))
        if ents:
            size = 0
            for e in ents:
                size += entry_size(e)
            pr.sent_entries(ents[-1].index, len(ents), size)
        else:
            pr.sent_entries(prev, 0, 0)
        return True

    def _send_snapshot(self, to: int, pr) -> bool:
        if not pr.recent_active:
            return False  # don't ship a snapshot to a peer that may be down
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        if snap.is_empty():
            raise AssertionError("need non-empty snapshot")
        pr.become_snapshot(snap.metadata.index)
        self.send(Message(MT.SNAPSHOT, to=to, snapshot=snap))
        return True

    def _send_commit_news(self) -> None:
        """Tell each follower the new commit index, at most one message per follower per Ready.

        etcd broadcasts an append on every commit advance, i.e. on nearly every
        ack: ~2 messages per follower per entry under load. Instead, every
        append already in the outbox is given the current commit (safe: the
        follower commits min(commit, last index of this append), and the log
        matching property makes that prefix equal to ours), and only a follower
        with no append in the outbox gets one (empty unless it lags).
        """
        self.commit_news = False
        if self.state != StateRole.LEADER:
            return
        committed = self.log.committed
        told = set()
        for m in self.msgs:
            if m.type == MT.APPEND:
                if m.commit < committed:
                    m.commit = committed
                told.add(m.to)
        for id in self.tracker.progress:
            if id != self.id and id not in told:
                self.maybe_send_append(id)

    def bcast_append(self) -> None:
        for id in self.tracker.progress:
            if id != self.id:
                self.maybe_send_append(id)

    def bcast_heartbeat(self, ctx: bytes = b"") -> None:
        committed = self.log.committed
        for id, pr in self.tracker.progress.items():
            if id != self.id:
                self.send(Message(MT.HEARTBEAT, to=id, commit=min(pr.match, committed), context=ctx))

    # -- role changes -------------------------------------------------------------------------

    def reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = 0
        self.lead = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout + self.rand.randrange(self.election_timeout)
        self.lead_transferee = 0
        self.tracker.reset_votes()
        nxt = self.log.last_index() + 1
        for id, pr in self.tracker.progress.items():
            pr.become_probe()
            pr.match = 0
            pr.next = nxt
            pr.recent_active = False
            if id == self.id:
                pr.match = self.log.stable_last()
                pr.recent_active = True
        self.pending_conf_index = 0
        self.stepping_down = False
        self.uncommitted_size = 0
        self.read_only.reset()
        self.pending_reads = []

    def become_follower(self, term: int, lead: int) -> None:
        self.reset(term)
        self.lead = lead
        self.state = StateRole.FOLLOWER

    def become_pre_candidate(self) -> None:
        if self.state == StateRole.LEADER:
            raise AssertionError("leader cannot become pre-candidate")
        # no term or vote change: a pre-vote disturbs nobody (thesis §9.6)
        self.tracker.reset_votes()
        self.lead = 0
        self.state = StateRole.PRE_CANDIDATE

    def become_candidate(self) -> None:
        if self.state == StateRole.LEADER:
            raise AssertionError("leader cannot become candidate")
        self.reset(self.term + 1)
        self.vote = self.id
        self.state = StateRole.CANDIDATE

    def become_leader(self) -> None:
        if self.state == StateRole.FOLLOWER:
            raise AssertionError("follower cannot become leader")
        self.reset(self.term)
        self.lead = self.id
        self.state = StateRole.LEADER
        self.tracker.progress[self.id].become_replicate()
        # conservatively, a conf change may be anywhere in the log we inherited
        self.pending_conf_index = self.log.last_index()
        # §8 / thesis §6.4: a no-op of our term lets us commit (and serve reads) promptly
        self.append_entry([Entry(term=0, index=0)])

    # -- ticks -------------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.state == StateRole.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.hup()
        elif self.state in (StateRole.PRE_CANDIDATE, StateRole.CANDIDATE):
            self.heartbeat_elapsed += 1
            if self.heartbeat_elapsed >= self.heartbeat_timeout:
                self.heartbeat_elapsed = 0
                self._request_votes(resend=True)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self._check_quorum()
            if self.state == StateRole.LEADER and self.lead_transferee:
                self.lead_transferee = 0  # transfer did not finish within an election timeout
        if self.state != StateRole.LEADER:
            return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat(self.read_only.last_pending_ctx() or b"")

    def _check_quorum(self) -> None:
        if not self.tracker.quorum_active(self.id):
            self.become_follower(self.term, 0)
            return
        for id, pr in self.tracker.progress.items():
            if id != self.id:
                pr.recent_active = False

    # -- elections ---------------------------------------------------------------------------------

    def hup(self, transfer: bool = False) -> None:
        if self.state == StateRole.LEADER or not self.promotable():
            return
        if self.has_unapplied_conf_changes():
            return  # campaign in the configuration the log has committed, not an older one (etcd's rule)
        if self.pre_vote and not transfer:
            self.campaign(pre=True)
        else:
            self.campaign(pre=False, transfer=transfer)

    def campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self.become_pre_candidate()
        else:
            self.become_candidate()
        self.campaign_transfer = transfer
        self.heartbeat_elapsed = 0  # paces the resending of vote requests (_tick_election)
        # our own vote: the candidate's vote for itself is in the HardState of the
        # Ready that carries the VOTE requests, so it is durable before they leave
        if self._poll(self.id, True) == VoteResult.WON:
            if pre:
                self.campaign(pre=False, transfer=transfer)
            else:
                self.become_leader()
            return
        self._request_votes()

    def _request_votes(self, resend: bool = False) -> None:
        """(Pre)vote requests to every voter, or with `resend` to those that have not answered.

        Unlike etcd, a (pre-)candidate asks again every heartbeat interval
        instead of waiting a whole new election timeout for one lost request
        (the paper's "servers retry RPCs if they do not receive a response in
        a timely manner", §5.1). Safe: the request is the same one, in the
        same term, from the same log (a candidate's log does not change), and
        answering it is idempotent (a voter grants again only the candidate it
        already voted for). It also wins the election one interval after the
        last voter's leader lease runs out, rather than one timeout after.
        """
        if self.state == StateRole.PRE_CANDIDATE:
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            vote_type, term = MT.VOTE, self.term
        ctx = CAMPAIGN_TRANSFER if self.campaign_transfer else b""
        li, lt = self.log.last_index(), self.log.last_term()
        for id in self.tracker.voters:
            if id != self.id and not (resend and id in self.tracker.votes):
                self.send(Message(vote_type, to=id, term=term, index=li, log_term=lt, context=ctx))

    def _poll(self, id: int, granted: bool) -> VoteResult:
        self.tracker.record_vote(id, granted)
        return self.tracker.tally_votes()[2]

    # -- step ------------------------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        t = m.type
        if m.term == 0:
            pass  # local message (or a forwarded read / transfer request)
        elif m.term > self.term:
            if t == MT.VOTE or t == MT.PRE_VOTE:
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = self.check_quorum and self.lead != 0 and self.election_elapsed < self.election_timeout
                if not force and in_lease:
                    return  # a leader is alive: don't let a disruptive node win (thesis §4.2.3)
            if t == MT.PRE_VOTE:
                pass  # never change term on a pre-vote
            elif t == MT.PRE_VOTE_RESP and not m.reject:
                pass  # our pre-vote term; we move to it only on winning
            elif t in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, 0)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and t in (MT.HEARTBEAT, MT.APPEND):
                # a stale leader: tell it our term so it steps down (else, with check_quorum or
                # pre-vote, it could keep isolated nodes from ever electing a new leader)
                self.send(Message(MT.APPEND_RESP, to=m.frm))
            elif t == MT.PRE_VOTE:
                self.send(Message(MT.PRE_VOTE_RESP, to=m.frm, term=self.term, reject=True))
            return

        if t == MT.VOTE or t == MT.PRE_VOTE:
            self._handle_vote_request(m)
            return
        if m.reject and (t == MT.VOTE_RESP or t == MT.PRE_VOTE_RESP):
            self._learn_commit(m)
        if self.state == StateRole.LEADER:
            self._step_leader(m)
        elif self.state == StateRole.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        resp_type = MT.VOTE_RESP if m.type == MT.VOTE else MT.PRE_VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote == 0 and self.lead == 0)
            or (m.type == MT.PRE_VOTE and m.term > self.term)
        )
        up_to_date = self.bug_vote_no_log_check or self.log.is_up_to_date(m.index, m.log_term)
        if can_vote and up_to_date:
            # the response carries the request's term (a pre-vote term is not ours yet)
            self.send(Message(resp_type, to=m.frm, term=m.term))
            if m.type == MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            # the rejection carries our commit index and its term: see _learn_commit
            committed = self.log.committed
            self.send(Message(resp_type, to=m.frm, term=self.term, reject=True,
                              commit=committed, log_term=self.log.term_or_zero(committed)))

    def _learn_commit(self, m: Message) -> None:
        """Commit what a voter that rejected us knows is committed, where our log holds the same entry.

        Membership takes effect on apply, so a leader that removed itself can be cut
        off (or lose power) after the removal committed but before the others heard
        so. They still count it as a voter, and it refuses them its vote (its log is
        longer, and it never campaigns): no one can win. Its commit index ends that.
        Safe by Log Matching: an entry with the same index and term is the same
        entry, with the same log before it, and a committed entry stays committed.
        """
        if m.commit <= self.log.committed or m.log_term == 0:
            return
        if self.log.match_term(m.commit, m.log_term):
            self.log.commit_to(m.commit)

    # -- leader -----------------------------------------------------------------------------------------

    def append_entry(self, ents: list[Entry]) -> None:
        li = self.log.last_index()
        size = 0
        for i, e in enumerate(ents):
            e.term = self.term
            e.index = li + 1 + i
            size += len(e.data)
        if self.max_uncommitted and self.uncommitted_size > 0 and self.uncommitted_size + size > self.max_uncommitted:
            raise ProposalDropped("too many uncommitted bytes")
        self.uncommitted_size += size
        self.log.append(ents)
        # the leader acknowledges its own entries only once they are durable (RawNode.advance)

    def propose(self, ents: list[Entry]) -> None:
        if self.state != StateRole.LEADER:
            raise ProposalDropped("not the leader" if self.lead else "no leader")
        if self.lead_transferee:
            raise ProposalDropped("leadership transfer in progress")
        if self.id not in self.tracker.progress:
            raise ProposalDropped("removed from the cluster")
        for e in ents:
            if e.type == EntryType.CONF_CHANGE and self.pending_conf_index > self.log.applied \
                    and not self.bug_two_conf_changes:
                raise ConfChangeRefused(f"a membership change (at index {self.pending_conf_index}) is still "
                                        f"being applied; one change at a time")
        self.append_entry(ents)
        for e in ents:
            if e.type == EntryType.CONF_CHANGE:
                self.pending_conf_index = e.index
        self.bcast_append()

    def committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def maybe_commit(self) -> bool:
        if self.log.maybe_commit(self.tracker.committed(), self.term, self.bug_commit_old_term):
            if self.pending_reads and self.committed_entry_in_current_term():
                reads, self.pending_reads = self.pending_reads, []
                for r in reads:
                    self._leader_read_index(r)
            return True
        return False

    def on_persisted(self) -> None:
        """Called by RawNode.advance: our own log is durable up to stable_last()."""
        if self.state != StateRole.LEADER:
            return
        pr = self.tracker.progress.get(self.id)
        if pr is not None and pr.maybe_update(self.log.stable_last()):
            if self.maybe_commit():
                self.commit_news = True

    def _leader_read_index(self, m: Message) -> None:
        """Answer a read with the commit index once it is known to be current (thesis §6.4).

        Until an entry of its own term commits, a new leader's commit index
        may lag what an earlier leader, or it before a restart, acknowledged:
        the read waits for that, a single voter too (it needs no heartbeat
        round, but its commit index after a restart is only what it last
        wrote, maybe below an acknowledged write).
        """
        if self.stepping_down:  # removed: another leader may already serve newer writes
            if m.frm in (0, self.id):
                raise ProposalDropped("removed from the cluster")
            return
        if self.bug_read_no_heartbeat:
            self._answer_read(m, self.log.committed)
            return
        if not self.committed_entry_in_current_term():
            self.pending_reads.append(m)
            return
        if self.tracker.voters == [self.id]:
            self._answer_read(m, self.log.committed)
            return
        if self.read_only.add_request(self.log.committed, m):
            self.read_only.recv_ack(self.id, m.context)
            self.bcast_heartbeat(m.context)

    def _answer_read(self, req: Message, index: int) -> None:
        if req.frm == 0 or req.frm == self.id:
            self.read_states.append(ReadState(index, req.context))
        else:
            self.send(Message(MT.READ_INDEX_RESP, to=req.frm, index=index, context=req.context))

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MT.READ_INDEX:
            self._leader_read_index(m)
            return
        if t == MT.TRANSFER_LEADER:
            self._handle_transfer(m.index)
            return
        pr = self.tracker.progress.get(m.frm)
        if pr is None:
            return
        if t == MT.APPEND_RESP:
            self._handle_append_resp(m, pr)
        elif t == MT.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and pr.inflights.full():
                # an append (or its ack) may have been lost: let one more through, and a
                # rejection will send us back to probing
                pr.inflights.free_first_one()
            if pr.match < self.log.last_index():
                self.maybe_send_append(m.frm)
            if m.context and not self.bug_read_no_heartbeat:
                acks = self.read_only.recv_ack(m.frm, m.context)
                if acks is not None and self.tracker.has_quorum(acks):
                    for rs in self.read_only.advance(m.context):
                        self._answer_read(rs.req, rs.index)
        elif t == MT.SNAP_STATUS:
            if pr.state != ProgressState.SNAPSHOT:
                return
            if m.reject:
                pr.pending_snapshot = 0
            pr.become_probe()
            pr.probe_sent = True  # wait for a heartbeat answer before probing again
        elif t == MT.UNREACHABLE:
            if pr.state == ProgressState.REPLICATE:
                pr.become_probe()

    def _handle_append_resp(self, m: Message, pr) -> None:
        pr.recent_active = True
        if m.reject:
            hint = m.reject_hint
            if m.reject_hint_term > 0:
                # fast backtracking: skip every entry of a term the follower doesn't have
                hint, _ = self.log.find_conflict_by_term(m.reject_hint, m.reject_hint_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self.maybe_send_append(m.frm)
            return
        old_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match + 1 >= self.log.first_index():
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self.maybe_commit():
            self.commit_news = True  # one message per follower per Ready, see _send_commit_news
        if old_paused:
            self.maybe_send_append(m.frm)
        # keep the pipeline full
        while self.maybe_send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self.send(Message(MT.TIMEOUT_NOW, to=m.frm))
        if self.stepping_down:
            self._maybe_step_down_removed()

    def _handle_transfer(self, transferee: int) -> None:
        """Thesis §3.10: bring the transferee up to date, then tell it to campaign now."""
        pr = self.tracker.progress.get(transferee)
        if pr is None or pr.is_learner:
            return
        if self.lead_transferee:
            if self.lead_transferee == transferee:
                return
            self.lead_transferee = 0
        if transferee == self.id:
            return
        self.election_elapsed = 0  # the transfer must finish within one election timeout
        self.lead_transferee = transferee
        if pr.match == self.log.last_index():
            self.send(Message(MT.TIMEOUT_NOW, to=transferee))
        else:
            self.maybe_send_append(transferee)

    # -- follower and candidate --------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MT.APPEND:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif t == MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t == MT.SNAPSHOT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == MT.TIMEOUT_NOW:
            self.hup(transfer=True)
        elif t == MT.READ_INDEX:
            if m.frm not in (0, self.id):
                return  # a peer's read that reached a non-leader: drop it, the peer retries
            if self.lead == 0:
                raise ProposalDropped("no leader")
            self.send(Message(MT.READ_INDEX, to=self.lead, context=m.context))
        elif t == MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))
        elif t == MT.TRANSFER_LEADER:
            if self.lead == 0:
                return
            self.send(Message(MT.TRANSFER_LEADER, to=self.lead, index=m.index))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
            self.become_follower(m.term, m.frm)  # a leader of our term exists
            self._step_follower(m)
            return
        if t == MT.READ_INDEX:
            if m.frm in (0, self.id):
                raise ProposalDropped("no leader")
            return
        want = MT.PRE_VOTE_RESP if self.state == StateRole.PRE_CANDIDATE else MT.VOTE_RESP
        if t != want:
            return
        res = self._poll(m.frm, not m.reject)
        if res == VoteResult.WON:
            if self.state == StateRole.PRE_CANDIDATE:
                self.campaign(pre=False)
            else:
                self.become_leader()
                self.bcast_append()
        elif res == VoteResult.LOST:
            self.become_follower(self.term, 0)

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self.send(Message(MT.APPEND_RESP, to=m.frm, index=log.committed))
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self.send(Message(MT.APPEND_RESP, to=m.frm, index=last_new))
            return
        hint_index = min(m.index, log.last_index())
        hint_index, hint_term = log.find_conflict_by_term(hint_index, m.log_term)
        self.send(Message(MT.APPEND_RESP, to=m.frm, index=m.index, reject=True,
                          reject_hint=hint_index, reject_hint_term=hint_term))

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self.send(Message(MT.HEARTBEAT_RESP, to=m.frm, context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is not None and self.restore(snap):
            self.send(Message(MT.APPEND_RESP, to=m.frm, index=self.log.last_index()))
        else:
            self.send(Message(MT.APPEND_RESP, to=m.frm, index=self.log.committed))

    def restore(self, snap: Snapshot) -> bool:
        meta = snap.metadata
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # we already have the snapshot's entries: just fast-forward the commit
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snap)
        self._apply_conf_state(meta.conf_state)
        return True

    def _apply_conf_state(self, cs: ConfState) -> None:
        if not cs.voters:
            return
        tr = self.tracker
        nxt = self.log.last_index() + 1
        for id in list(tr.progress):
            if id not in cs.voters and id not in cs.learners:
                tr.remove_node(id)
        for v in cs.voters:
            tr.add_node(v, nxt)
        for v in cs.learners:
            tr.add_node(v, nxt, learner=True)

    # -- membership (single-server changes, thesis §4.1) ---------------------------------------------------
    #
    # Why single-server changes rather than joint consensus: every change we need (add or remove
    # one member, add a learner, promote it) moves one server at a time, and for one server the
    # old and new majorities always overlap, so no intermediate joint configuration is needed.
    # The rules that make it safe (thesis §4.1 and its 2015 erratum):
    #   * one change at a time: a change is proposed only once the previous one is applied
    #     (pending_conf_index <= applied); two in flight could form disjoint majorities;
    #   * only after the leader has committed an entry of its own term (its no-op), so a change
    #     from a deposed leader's term cannot be overwritten after a newer one took effect;
    #   * a configuration takes effect when its entry is applied (as in etcd), on every member.
    # Learners take no part in quorums or elections, so adding, removing or promoting one is also
    # a single-server change. Joint consensus (etcd's ConfChangeV2) would buy atomic multi-member
    # replacements at the price of a second configuration in every quorum computation.

    def propose_conf_change(self, cc: ConfChange, force: bool = False) -> None:
        """Propose one membership change; ConfChangeRefused says why it cannot be made now.

        Besides the protocol's rules, refuses what an operator would regret (etcd's strict
        reconfiguration check), unless `force`: a change after which fewer voters than a quorum
        have been heard from lately (a new voter counts as not started).
        """
        if self.state != StateRole.LEADER:
            raise ProposalDropped("not the leader" if self.lead else "no leader")
        if not self.committed_entry_in_current_term():
            raise ConfChangeRefused("the leader has not yet committed an entry of its term; retry shortly")
        self._check_conf_change(cc, force)
        self.propose([Entry(term=0, index=0, type=EntryType.CONF_CHANGE, data=encode_conf_change(cc))])

    def _check_conf_change(self, cc: ConfChange, force: bool) -> None:
        tr = self.tracker
        id = cc.node_id
        if id <= 0:
            raise ConfChangeRefused(f"member id must be > 0, not {id}")
        voter, learner = id in tr.voters, id in tr.learners
        if cc.change_type == ConfChange.ADD_LEARNER:
            if voter or learner:
                raise ConfChangeRefused(f"member {id} is already a {'voter' if voter else 'learner'}")
            return
        if cc.change_type == ConfChange.ADD_NODE:
            if voter:
                raise ConfChangeRefused(f"member {id} is already a voter")
            if learner:
                if not tr.progress[id].recent_active:
                    raise ConfChangeRefused(f"learner {id} has not been heard from lately; promote it once it "
                                            f"runs and has caught up")
                lag = self.log.last_index() - tr.progress[id].match
                if lag > self.max_learner_lag:
                    raise ConfChangeRefused(
                        f"learner {id} is {lag} entries behind the leader (at most {self.max_learner_lag} "
                        f"to be promoted); promote it once it has caught up")
            new_voters = tr.voters + [id]
            if not force and not learner:
                active = tr.active_voters(self.id, tr.voters)  # the new member has not started yet
                quorum = len(new_voters) // 2 + 1
                if active < quorum:
                    raise ConfChangeRefused(
                        f"adding voter {id} would need {quorum} of {len(new_voters)} voters for a quorum, but only "
                        f"{active} are reachable; the cluster would stop if the new member never starts "
                        f"(add it as a learner first, or force)")
            return
        if cc.change_type == ConfChange.REMOVE_NODE:
            if not voter and not learner:
                raise ConfChangeRefused(f"member {id} is not in the cluster")
            if voter:
                rest = [v for v in tr.voters if v != id]
                if not rest:
                    raise ConfChangeRefused(f"member {id} is the only voter; it cannot be removed")
                active = tr.active_voters(self.id, rest)
                quorum = len(rest) // 2 + 1
                if not force and active < quorum:
                    raise ConfChangeRefused(
                        f"removing member {id} would leave {len(rest)} voters of which only {active} are "
                        f"reachable, fewer than the {quorum} a quorum needs")
            return
        raise ConfChangeRefused(f"unknown membership change type {cc.change_type}")

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        tr = self.tracker
        nxt = self.log.last_index() + 1
        if cc.change_type == ConfChange.ADD_NODE:
            tr.add_node(cc.node_id, nxt)
        elif cc.change_type == ConfChange.ADD_LEARNER:
            tr.add_node(cc.node_id, nxt, learner=True)
        elif cc.change_type == ConfChange.REMOVE_NODE:
            tr.remove_node(cc.node_id)
            if cc.node_id == self.lead_transferee:
                self.lead_transferee = 0
        else:
            raise ValueError(f"unknown conf change type {cc.change_type}")
        if self.state == StateRole.LEADER:
            if cc.node_id == self.id and cc.change_type == ConfChange.REMOVE_NODE:
                self.stepping_down = True
                self.maybe_commit()  # the quorum changed
                self.bcast_append()
                self._maybe_step_down_removed()
            elif tr.voters and self.maybe_commit():
                self.bcast_append()  # the quorum changed
        return tr.conf_state()

    def has_unapplied_conf_changes(self) -> bool:
        """Whether a committed membership change is not yet applied: the membership in force is then
        older than the committed one (after a restart whose state machine lagged, say), and a
        campaign must wait for the apply."""
        log = self.log
        if log.applied >= log.committed:
            return False
        return any(e.type == EntryType.CONF_CHANGE for e in log.entries(log.applied + 1, log.committed + 1))

    def _maybe_step_down_removed(self) -> None:
        """A removed leader steps down once a quorum of the new voters holds its whole log.

        Stepping down at once (when the removal is applied) can leave the others
        stuck: they may not know the removal committed (so still need this
        member's vote) while this member's log is longer than theirs (so it
        refuses it). Leading on without counting itself (thesis §4.2.2) until
        they hold everything it has (it takes no new proposals) ends that: its
        vote is then theirs to win. The most caught-up one is told to campaign
        at once (TIMEOUT_NOW), as in a leadership transfer.
        """
        tr = self.tracker
        last = self.log.last_index()
        caught_up = [v for v in tr.voters if tr.progress[v].match >= last]
        if len(caught_up) < tr.quorum():
            return  # their acks call again
        self.maybe_commit()
        self.commit_news = True  # the final commit index goes out with this Ready
        self._send_commit_news()
        self.send(Message(MT.TIMEOUT_NOW, to=caught_up[0]))
        self.become_follower(self.term, 0)

    @staticmethod
    def decode_conf_change(data: bytes) -> ConfChange:
        return decode_conf_change(data)
