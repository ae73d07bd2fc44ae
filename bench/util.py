"""Small shared pieces: percentiles and what /proc says about a process (CPU time, memory)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence; nan when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def pcts(values: Iterable[float], qs: Sequence[float] = (50, 99, 99.9)) -> dict[float, float]:
    data = sorted(values)
    return {q: percentile(data, q) for q in qs}


def cpu_seconds(pid: int | None, split: bool = False):
    """user + system CPU seconds of a process so far (or (user, system) with split), None if gone."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    return (stat.user, stat.system) if split else stat.user + stat.system


@dataclass(frozen=True)
class ProcStat:
    """What /proc/<pid>/stat says of a process (all its threads, the ended ones included)."""

    pid: int
    started: int  # clock ticks after boot: with the pid, names the process (pids are reused)
    ppid: int
    user: float  # CPU seconds so far
    system: float


def proc_stat(pid: int | None) -> ProcStat | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return ProcStat(pid, int(fields[19]), int(fields[1]), int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
    except (OSError, ValueError, IndexError):
        return None


def memory_kb(pid: int | None) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in kB: resident set now and its peak since the process started."""
    rss = hwm = None
    if pid is None:
        return rss, hwm
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


def listening_pid(port: int) -> int:
    """The process listening on TCP `port` (found by its socket's inode, as ss -p does); the
    bench reads RabbitMQ's CPU off the broker its URL names, not off every beam.smp (rabbitmqctl
    runs one for a moment, and other nodes may run on the machine)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for entry in os.listdir("/proc") if inodes else ():
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                            owners.add(int(entry))
                            break
    if len(owners) != 1:
        raise RuntimeError(f"cannot tell which process listens on port {port} (found {sorted(owners)})")
    return owners.pop()


def pids_by_comm(name: str) -> list[int]:
    """Processes whose /proc/<pid>/comm is `name` (read only: --pin-api pins every postgres)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == name:
                    found.append(int(entry))
        except OSError:
            continue
    return found


async def sleep_until(deadline: float) -> None:
    import asyncio

    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def fmt_rate(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"


def fmt_ms(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"
