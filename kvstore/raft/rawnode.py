"""The thread-safe-by-construction facade the node loop drives (etcd's RawNode).

The loop is: tick()/step() as events arrive; when has_ready(), take ready(),
handle it (see Ready), then advance(ready). Stepping between ready() and
advance() is allowed (e.g. while the fsync runs); a second ready() before
advance() is not.

Committed entries handed out by ready() are not thereby applied: the
application reports what it has applied with advance_apply_to(index) (as
raft-rs does), so an apply that lags (another thread, a big backlog) is seen
by the core as not yet applied (e.g. membership changes wait for it).
"""
from __future__ import annotations

from .config import Config
from .errors import ProposalDropped
from .raft import Raft
from .ready import ProgressView, Ready, Status
from .storage import Storage
from .types import ConfChange, ConfState, Entry, EntryType, HardState, Message, MessageType as MT, SoftState, StateRole

_LOCAL = frozenset({MT.HUP, MT.BEAT, MT.PROPOSE, MT.UNREACHABLE, MT.SNAP_STATUS})
_RESPONSES = frozenset({MT.APPEND_RESP, MT.VOTE_RESP, MT.PRE_VOTE_RESP, MT.HEARTBEAT_RESP})


class RawNode:
    def __init__(self, config: Config, storage: Storage) -> None:
        self.raft = Raft(config, storage)
        self._prev_soft = SoftState(self.raft.lead, self.raft.state)
        self._prev_hard = self.raft.hard_state()
        self._outstanding: Ready | None = None

    # -- inputs ---------------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (tests, and a node that knows it should lead)."""
        self.raft.hup()

    def step(self, msg: Message) -> None:
        if msg.type in _LOCAL:
            raise ValueError(f"{msg.type.name} is a local message type")
        if msg.type in _RESPONSES and msg.frm not in self.raft.tracker.progress:
            return  # a response from a node that is not (or no longer) a member
        self.raft.step(msg)

    def propose(self, data: bytes) -> None:
        self.raft.propose([Entry(term=0, index=0, type=EntryType.NORMAL, data=data)])

    def propose_batch(self, datas: list[bytes]) -> None:
        """Propose many entries at once: one append to the log, one AppendEntries per follower.

        All or nothing: if the core refuses (not leader, transfer, too many
        uncommitted bytes) ProposalDropped is raised and none is appended.
        """
        if datas:
            self.raft.propose([Entry(term=0, index=0, type=EntryType.NORMAL, data=d) for d in datas])

    def propose_conf_change(self, cc: ConfChange) -> None:
        self.raft.propose_conf_change(cc)

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        return self.raft.apply_conf_change(cc)

    def read_index(self, ctx: bytes) -> None:
        if not ctx:
            raise ValueError("read_index needs a non-empty, unique ctx")
        r = self.raft
        if r.state != StateRole.LEADER and r.lead == 0:
            raise ProposalDropped("no leader")
        r.step(Message(MT.READ_INDEX, context=ctx))

    def transfer_leader(self, to: int) -> None:
        self.raft.step(Message(MT.TRANSFER_LEADER, index=to))

    def report_unreachable(self, id: int) -> None:
        self.raft.step(Message(MT.UNREACHABLE, frm=id))

    def report_snapshot(self, id: int, success: bool) -> None:
        self.raft.step(Message(MT.SNAP_STATUS, frm=id, reject=not success))

    # -- outputs ----------------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        r = self.raft
        log = r.log
        if r.msgs or r.read_states or log.unstable or log.unstable_snapshot is not None:
            return True
        if log.has_next_committed():
            return True
        ps = self._prev_soft
        if ps.leader_id != r.lead or ps.role != r.state:
            return True
        ph = self._prev_hard
        return ph.term != r.term or ph.vote != r.vote or ph.commit != log.committed

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        r = self.raft
        log = r.log
        rd = Ready()
        if self._prev_soft.leader_id != r.lead or self._prev_soft.role != r.state:
            rd.soft_state = SoftState(r.lead, r.state)
            self._prev_soft = rd.soft_state
        ph = self._prev_hard
        if ph.term != r.term or ph.vote != r.vote or ph.commit != log.committed:
            hs = HardState(r.term, r.vote, log.committed)
            rd.hard_state = hs
            rd.must_sync = ph.term != hs.term or ph.vote != hs.vote
            self._prev_hard = hs
        if log.unstable:
            rd.entries = list(log.unstable)
            rd.must_sync = True
        if log.unstable_snapshot is not None:
            rd.snapshot = log.unstable_snapshot
            rd.must_sync = True
        elif log.has_next_committed():
            rd.committed_entries = log.next_committed()
            if rd.committed_entries:
                log.applying = rd.committed_entries[-1].index
        rd.messages, rd.persisted_messages = r.take_messages()
        if r.read_states:
            rd.read_states = r.read_states
            r.read_states = []
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        if rd is not self._outstanding:
            raise RuntimeError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        r = self.raft
        log = r.log
        if rd.snapshot is not None:
            idx = rd.snapshot.metadata.index
            log.stable_snap_to(idx)
            log.applied_to(idx)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            if r.uncommitted_size:
                size = 0
                for e in rd.committed_entries:
                    size += len(e.data)
                r.uncommitted_size = max(0, r.uncommitted_size - size)
        r.on_persisted()

    def advance_apply_to(self, index: int) -> None:
        """The application has applied every committed entry up to `index` (raft-rs's advance_apply_to)."""
        log = self.raft.log
        if index > log.committed:
            raise AssertionError(f"applied index {index} reported beyond the commit index {log.committed}")
        log.applied_to(index)

    # -- observation -----------------------------------------------------------------------

    def status(self) -> Status:
        r = self.raft
        st = Status(id=r.id, term=r.term, vote=r.vote, commit=r.log.committed, applied=r.log.applied,
                    lead=r.lead, role=r.state, lead_transferee=r.lead_transferee)
        if r.state == StateRole.LEADER:
            for id, pr in r.tracker.progress.items():
                st.progress[id] = ProgressView(pr.match, pr.next, pr.state, pr.recent_active, pr.inflights.count())
        return st

    def conf_state(self) -> ConfState:
        return self.raft.tracker.conf_state()
