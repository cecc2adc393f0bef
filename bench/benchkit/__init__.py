"""Helpers for bench/run.py: processes, tools, the SendKit side, the peers, the report."""
