"""Jepsen-style testing: recorded histories and the linearizability checker."""
