"""kvstore: a replicated key-value store whose nodes agree through Raft."""

__version__ = "0.1.0"
