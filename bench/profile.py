"""Sampling profiles of one gateway process with py-spy, attached by pid during a load phase.

py-spy writes collapsed stacks ("root;...;leaf count", Brendan Gregg's format):
open bench/out/<name>.txt in https://www.speedscope.app (it imports that format)
or feed it to flamegraph.pl. With --profile-format speedscope the file is
speedscope JSON instead (then no top list is printed). Idle time (the event loop
waiting in epoll) is not sampled, so the shares are shares of CPU actually used.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


class Recorder:
    """`py-spy record --pid` running in the background until stop()."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100, native: bool = False, fmt: str = "raw"):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            fmt,
            "-o",
            str(out),
            "--duration",
            "3600",
        ]
        if native:
            argv.append("--native")
        self.log = out.with_suffix(".pyspy.log")
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for _ in range(300):
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            self.proc.kill()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile; its output: {self.log.read_text()[-2000:]}")


@dataclass
class Profile:
    total: int = 0
    self_time: Counter = field(default_factory=Counter)  # function (file) -> samples as the leaf
    inclusive: Counter = field(default_factory=Counter)  # function (file) -> samples on the stack
    by_package: Counter = field(default_factory=Counter)  # top-level package of the leaf -> samples


def _frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m["func"], m["file"]


def _package(file: str) -> str:
    file = file.replace("\\", "/")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker.startswith("/lib"):
                file = "stdlib:" + file.split("/", 1)[-1]
    if file.startswith("<frozen"):
        return "stdlib"
    if file.startswith("stdlib:"):
        rest = file[len("stdlib:") :]
        return "stdlib:" + (rest.split("/")[0] if "/" in rest else rest.removesuffix(".py"))
    head = file.split("/")[0]
    return head.removesuffix(".py") or "?"


def parse(path: Path) -> Profile:
    prof = Profile()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        prof.total += n
        func, file = frames[-1]
        prof.self_time[f"{func} ({file})"] += n
        prof.by_package[_package(file)] += n
        for name in {f"{fn} ({fl})" for fn, fl in frames}:
            prof.inclusive[name] += n
    return prof


def report(prof: Profile, title: str, top: int = 25) -> str:
    if not prof.total:
        return f"{title}: no samples (was the process busy?)"
    lines = [f"{title}: {prof.total} samples"]

    def block(heading: str, counter: Counter, n: int) -> None:
        lines.append(f"  {heading}")
        for name, count in counter.most_common(n):
            lines.append(f"    {count / prof.total * 100:5.1f}%  {name}")

    block("by package (self time of the leaf frame)", prof.by_package, 15)
    block(f"top {top} functions by self time", prof.self_time, top)
    # Inclusive: skip the frames every stack shares (the event loop's run methods).
    inclusive = Counter({k: v for k, v in prof.inclusive.items() if v < prof.total * 0.98})
    block(f"top {top} functions by inclusive time", inclusive, top)
    return "\n".join(lines)
