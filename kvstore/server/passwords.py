"""Password hashes: scrypt (hashlib), a slow, memory-hard KDF, compared in constant time.

The member that receives UserAdd or UserChangePassword hashes the password
before proposing, so the log, the snapshots and the state machine only ever
hold the hash. The stored form names its parameters, so they can be raised
later without breaking existing users:
``scrypt$<log2 n>$<r>$<p>$<salt hex>$<hash hex>``.
"""
from __future__ import annotations

import hashlib
import hmac
import os

__all__ = ["hash_password", "verify_password", "MAX_PASSWORD_BYTES"]

#: n = 2**14, r = 8, p = 1: 16 MiB of memory and tens of milliseconds per guess.
LOG2_N, R, P = 14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PASSWORD_BYTES = 1024


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=64 << 20,
                          dklen=HASH_BYTES)


def hash_password(password: str) -> bytes:
    salt = os.urandom(SALT_BYTES)
    digest = _derive(password, salt, LOG2_N, R, P)
    return f"scrypt${LOG2_N}${R}${P}${salt.hex()}${digest.hex()}".encode()


def verify_password(password: str, stored: bytes) -> bool:
    """Whether ``password`` matches ``stored`` (False for a malformed stored hash)."""
    try:
        scheme, log2_n, r, p, salt, digest = stored.decode().split("$")
        if scheme != "scrypt":
            return False
        want = bytes.fromhex(digest)
        got = _derive(password, bytes.fromhex(salt), int(log2_n), int(r), int(p))
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(got, want)
