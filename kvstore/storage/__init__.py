"""Durability: the write-ahead log (wal, raft_log), the LMDB state machine and snapshots."""
