"""Auth tokens: signed with a key every member holds, so any member accepts any member's token.

A token is ``<payload>.<signature>``, both URL-safe base64; the payload names
the user, the auth revision it was issued at and its expiry (wall-clock
milliseconds), and the signature is HMAC-SHA256 over the payload with the
token key.

Why this and not etcd's simple tokens: a simple token is a random string that
only the member that issued it knows, so a client must re-authenticate on
every member it talks to (and after every leader change). Here the key is part
of the replicated auth state: the member that proposes `auth enable` draws 32
random bytes and they travel with the command, so every member derives the
same key from the log, a token issued by one is good on all, and every
`auth enable` starts a new key (old tokens die with it). The key is as secret
as the data directory, which holds all the data anyway.

The expiry follows the issuing member's wall clock: a skewed clock shortens
or lengthens a token's life, it cannot grant anything (permissions are checked
against the replicated state on every request).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = ["Token", "issue", "parse", "TokenError"]

_SIG_BYTES = 32


class TokenError(Exception):
    """A token that is not one of ours (malformed or tampered with)."""


@dataclass(frozen=True, slots=True)
class Token:
    user: str
    auth_revision: int
    expires_ms: int


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def issue(key: bytes, user: str, auth_revision: int, expires_ms: int) -> str:
    nonce = os.urandom(8).hex()
    payload = f"{auth_revision}:{expires_ms}:{nonce}:{user}".encode()
    sig = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(sig)}"


def parse(token: str) -> tuple[Token, bytes, bytes]:
    """The token's claims, payload and signature, NOT yet verified (see verify); TokenError if malformed."""
    try:
        payload_s, sig_s = token.split(".")
        payload, sig = _unb64(payload_s), _unb64(sig_s)
        rev, expires, _nonce, user = payload.decode().split(":", 3)
        return Token(user, int(rev), int(expires)), payload, sig
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenError(f"malformed token ({e})") from None


def verify(key: bytes, payload: bytes, sig: bytes) -> bool:
    return len(sig) == _SIG_BYTES and hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest(), sig)
