"""Alarms raised about members (etcd's alarm list), kept in the state machine.

An alarm is raised and cleared through the log (Command.alarm), so every
member holds the same list and it survives restarts and snapshots: it is
stored in the state machine's meta database in the same transaction as the
entry that changed it. CORRUPT: the member's key/value state differs from
the others' at the same log index (see hash_kv.py). NOSPACE: the leader's
store passed --quota-backend-bytes; while it is raised every member refuses
commands that add data (see quota.py), and the leader clears it once space
has been reclaimed.
"""
from __future__ import annotations

CORRUPT = "CORRUPT"
NOSPACE = "NOSPACE"
KNOWN = (CORRUPT, NOSPACE)

Alarms = frozenset  # of (member_id, alarm name)


def encode(alarms: frozenset[tuple[int, str]]) -> bytes:
    return ";".join(f"{m}:{a}" for m, a in sorted(alarms)).encode()


def decode(raw: bytes | None) -> frozenset[tuple[int, str]]:
    if not raw:
        return frozenset()
    out = set()
    for part in raw.decode().split(";"):
        member, _, name = part.partition(":")
        out.add((int(member), name))
    return frozenset(out)


def change(alarms: frozenset[tuple[int, str]], member_id: int, alarm: str,
           activate: bool) -> frozenset[tuple[int, str]]:
    """The alarm set after raising, or clearing, `alarm` of `member_id` (0 / "": every member / alarm)."""
    if activate:
        return alarms | {(member_id, alarm)}
    return frozenset((m, a) for m, a in alarms
                     if not ((member_id in (0, m)) and (alarm in ("", a))))


def has(alarms: frozenset[tuple[int, str]], alarm: str) -> bool:
    """Whether any member has `alarm` raised."""
    return any(a == alarm for _, a in alarms)
