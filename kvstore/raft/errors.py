"""Errors the core raises to its caller (storage errors live in storage.py)."""
from __future__ import annotations


class ProposalDropped(Exception):
    """The proposal or read could not be accepted here; the caller retries elsewhere.

    Raised when this node is not the leader (the server redirects the client),
    when no leader is known, while a leadership transfer is in progress, or
    when the uncommitted-bytes budget is exhausted.
    """


class ConfChangeRefused(ProposalDropped):
    """A membership change the leader will not propose now; the message says why.

    Unlike a plain ProposalDropped, sending it to another member does not
    help: the change is invalid (not a member, already a voter), unsafe now
    (another change still in flight, a learner too far behind, a quorum that
    would be lost), or must wait (the leader has not committed an entry of
    its term yet).
    """
