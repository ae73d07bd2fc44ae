"""gateway.process.give_way: the relay and the worker lower their CPU priority, and only their own.

Each case runs in a child process, so that this one keeps its priority. /proc/self/autogroup
reads "/autogroup-42 nice 0" in a session of its own, nothing in the session the machine booted
with (the root group, which has no nice to set) and is absent without autogroup: the last two
read as "none"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
PROBE = """
import os, sys
from gateway import process
process.give_way(int(sys.argv[1]))
try:
    group = (open("/proc/self/autogroup").read().split() or ["none"])[-1]
except OSError:
    group = "none"
print(os.getpriority(os.PRIO_PROCESS, 0), group)
"""


def own_group() -> str:
    """This process's autogroup nice, or 'none'."""
    return (AUTOGROUP.read_text().split() or ["none"])[-1] if AUTOGROUP.exists() else "none"


def probe(nice: int, *, own_session: bool, start_nice: int = 0) -> tuple[int, str]:
    """(nice, autogroup nice or 'none') of a child that called give_way(nice)."""
    argv = [sys.executable, "-c", PROBE, str(nice)]
    if start_nice:
        argv = ["nice", "-n", str(start_nice), *argv]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, start_new_session=own_session, timeout=60
    ).stdout.split()
    return int(out[0]), out[1]


def test_a_process_leading_its_session_lowers_itself_and_its_session():
    nice, group = probe(7, own_session=True)
    assert nice == 7
    assert group == ("7" if AUTOGROUP.exists() else "none")


def test_a_process_sharing_its_session_leaves_the_session_alone():
    before = own_group()
    nice, group = probe(7, own_session=False)
    assert nice == 7 and group == before
    assert own_group() == before  # ours, unchanged


def test_a_lower_priority_given_by_the_launcher_is_kept():
    nice, _ = probe(7, own_session=True, start_nice=19)  # nice(1) stops at 19 whatever ours is
    assert nice == 19


def test_zero_changes_nothing():
    nice, group = probe(0, own_session=True)
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)
    assert group == ("0" if AUTOGROUP.exists() else "none")  # a new session starts at 0
