"""Errors the core raises to its caller (storage errors live in storage.py)."""
from __future__ import annotations


class ProposalDropped(Exception):
    """The proposal or read could not be accepted here; the caller retries elsewhere.

    Raised when this node is not the leader (the server redirects the client),
    when no leader is known, while a leadership transfer is in progress, or
    when the uncommitted-bytes budget is exhausted.
    """
