"""Helpers shared by the test suites (see tests/support/procs.py)."""
