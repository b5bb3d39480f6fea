"""Wire form of a ConfChange inside a CONF_CHANGE log entry (opaque to storage)."""
from __future__ import annotations

import struct

from .types import ConfChange

_HEAD = struct.Struct(">BQ")


def encode_conf_change(cc: ConfChange) -> bytes:
    return _HEAD.pack(cc.change_type, cc.node_id) + cc.context


def decode_conf_change(data: bytes) -> ConfChange:
    change_type, node_id = _HEAD.unpack_from(data)
    return ConfChange(change_type=change_type, node_id=node_id, context=bytes(data[_HEAD.size :]))
