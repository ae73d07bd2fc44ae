"""What each gateway process of a drill spent: CPU per payment, and the connections it holds
to the database formation and the broker cluster (for the README's sizing)."""

from __future__ import annotations

import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

from tests.e2e.stack import Stack

DATABASE_PORTS = {5441, 5442}
BROKER_PORTS = {5681, 5682, 5683}
_SOCKET = re.compile(r"\s(\S+):(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+),")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _connections() -> dict[int, tuple[int, int]]:
    """pid -> (database connections, broker connections), from the kernel's socket table."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for line in out.splitlines():
        match = _SOCKET.search(line)
        if match is None:
            continue
        port, pid = int(match.group(2)), int(match.group(3))
        if port in DATABASE_PORTS:
            counts[pid][0] += 1
        elif port in BROKER_PORTS:
            counts[pid][1] += 1
    return {pid: (db, mq) for pid, (db, mq) in counts.items()}


def report(stack: Stack, payments: int) -> str:
    """One line per gateway process: CPU ms per payment over its whole life, connections now."""
    connections = _connections()
    lines = []
    for name in stack.gateway_names():
        pid = stack.procs[name].pid
        db, mq = connections.get(pid, (0, 0))
        cpu = _cpu_seconds(pid) * 1000 / payments
        lines.append(f"{name}: {cpu:.2f} CPU ms per payment, {db} database and {mq} broker connections")
    return "\n".join(lines)
