"""Operator tools behind ``python -m telepathy <verb>``: status/list, verify, export, plot."""
