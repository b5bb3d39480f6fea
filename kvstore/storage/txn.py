"""Evaluating a txn's compares against the stored record of a key.

A missing key has version, create_revision and mod_revision 0, so
``version(k) == 0`` is the usual "does not exist" guard; a VALUE compare
against a missing key is false whatever the operator (etcd's rule).
An unset target_union compares against the zero value of the target.
"""
from __future__ import annotations

from kvstore.v1 import kv_pb2

from .keys import HEADER_SIZE, decode_header

_C = kv_pb2.Compare


def compare_holds(c: kv_pb2.Compare, raw: bytes | None) -> bool:
    """Whether compare `c` holds for a key whose stored record is `raw`."""
    target = c.target
    if target == _C.VALUE:
        if raw is None:
            return False
        return _apply(c.result, raw[HEADER_SIZE:], c.value)
    if raw is None:
        actual = 0
    else:
        create, mod, version = decode_header(raw)
        actual = version if target == _C.VERSION else create if target == _C.CREATE else mod
    if target == _C.VERSION:
        expected = c.version
    elif target == _C.CREATE:
        expected = c.create_revision
    else:
        expected = c.mod_revision
    return _apply(c.result, actual, expected)


def _apply(result: int, actual, expected) -> bool:
    if result == _C.EQUAL:
        return actual == expected
    if result == _C.NOT_EQUAL:
        return actual != expected
    if result == _C.GREATER:
        return actual > expected
    return actual < expected  # LESS (validation rejects unknown operators)
