"""The node process: drives raft, the peer transport and the client services.

Start with `node.py` (the Ready loop), then `kv_service.py` (a client call),
`transport.py` / `peer_server.py` / `peer_wire.py` (the peer API) and `main.py` (the process).
"""
