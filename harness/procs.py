"""Run the project's console scripts as real processes in tests.

Small and generic: works for ``mockbank``, ``gateway-api``, ``gateway-worker``...

    from harness.procs import ScriptProcess, free_port

    port = free_port()
    async with ScriptProcess("mockbank", "--port", str(port),
                             env={"FAILURE_RATE": "0"}) as bank:
        await bank.wait_http(f"http://127.0.0.1:{port}/health")
        ...                      # bank.stop() runs on exit (SIGTERM, then SIGKILL)

    # or step by step, e.g. in a pytest fixture:
    proc = ScriptProcess("mockbank", "--port", str(port)).start()
    await proc.wait_http(url, timeout=15)   # raises ProcessError with the stderr tail
    await proc.kill()                       # SIGKILL (crash tests); or await proc.stop()

    # a short-lived command (e.g. a bad configuration that must exit 2):
    result = run_script("mockbank", env={"FAILURE_RATE": "2"})
    assert result.returncode == 2 and "FAILURE_RATE" in result.stderr

Scripts are looked up next to ``sys.executable`` (the venv's bin directory).
``env`` is laid over a copy of ``os.environ`` (``inherit_env=False`` starts
from an empty environment plus PATH); a value of ``None`` removes a variable.
stdout and stderr go to anonymous temporary files (or both to ``log``, a file
appended to), so a chatty process never blocks on a full pipe;
``stderr_tail()`` / ``stdout_tail()`` / ``read_stdout()`` read them any time.
The child runs in its own session, so a Ctrl-C in the terminal does not hit
it before the test's teardown does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import aiohttp

__all__ = ["ProcessError", "ScriptProcess", "free_port", "run_script", "script_path"]


class ProcessError(RuntimeError):
    """The process died or did not become ready; the message has its stderr tail."""


# Ports handed out by this process: never twice, though the first may not be bound yet.
_HANDED_OUT: set[int] = set()
FIRST_PORT = 20000


def _port_range() -> range:
    """Ports below the kernel's ephemeral range. A port the OS picks (bind to port 0) comes from
    that range, and so does the source port of every outgoing connection, which can take it
    between our check and the process's bind (CI once saw gateway-api fail with "address
    already in use" that way)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(FIRST_PORT, max(FIRST_PORT + 1000, low))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, outside the ephemeral range and not handed out before."""
    return free_ports(1, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports that are free right now, outside the ephemeral
    range and not handed out before by this process."""
    ports = _port_range()
    for _ in range(1000):
        first = random.randrange(ports.start, ports.stop - count + 1)
        candidates = range(first, first + count)
        if _HANDED_OUT.intersection(candidates):
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in candidates:
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.update(candidates)
        return first
    raise ProcessError(f"no {count} free consecutive ports between {ports.start} and {ports.stop}")


def script_path(name: str) -> str:
    """Path of console script ``name`` in the running interpreter's bin directory."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ProcessError(
            f"console script {name!r} not found in {path.parent} (did you run `pip install -e '.[dev]'`?)"
        )
    return str(path)


def _build_env(env: Mapping[str, str | None] | None, inherit_env: bool) -> dict[str, str]:
    base = dict(os.environ) if inherit_env else {"PATH": os.environ.get("PATH", "")}
    base.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (env or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = str(value)
    return base


def _tail(f: IO[bytes] | None, max_bytes: int) -> str:
    if f is None or f.closed:
        return ""
    fd = f.fileno()
    size = os.fstat(fd).st_size
    start = max(0, size - max_bytes)
    return os.pread(fd, size - start, start).decode("utf-8", "replace")


def run_script(
    name: str, *args: str, env: Mapping[str, str | None] | None = None, inherit_env: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """Run a console script to completion; returns CompletedProcess with text output."""
    return subprocess.run(
        [script_path(name), *args],
        env=_build_env(env, inherit_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ScriptProcess:
    """A console script running in the background, with readiness waits and stop/kill."""

    def __init__(
        self,
        script: str,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        inherit_env: bool = True,
        cwd: str | os.PathLike | None = None,
        argv: Sequence[str] | None = None,
        log: str | os.PathLike | None = None,
    ) -> None:
        """``script`` is a console-script name; or pass a full ``argv`` to run anything.
        ``log``: a file both stdout and stderr are appended to (kept after the process)."""
        self.name = script
        self.argv = list(argv) if argv is not None else [script_path(script), *args]
        self.env = _build_env(env, inherit_env)
        self.cwd = cwd
        self.log = Path(log) if log is not None else None
        self.popen: subprocess.Popen | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> ScriptProcess:
        """Spawn the process (does not wait for readiness). Returns self."""
        if self.popen is not None:
            raise ProcessError(f"{self.name} already started")
        if self.log is not None:
            self._out = self._err = open(self.log, "ab")  # closed by close()
        else:
            self._out = tempfile.TemporaryFile(prefix=f"{self.name}-out-")
            self._err = tempfile.TemporaryFile(prefix=f"{self.name}-err-")
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code (negative signal number if killed)."""
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        return _tail(self._err, max_bytes)

    def stdout_tail(self, max_bytes: int = 4000) -> str:
        return _tail(self._out, max_bytes)

    def stdout_size(self) -> int:
        """Bytes written to stdout so far (an offset for read_stdout)."""
        return 0 if self._out is None or self._out.closed else os.fstat(self._out.fileno()).st_size

    def read_stdout(self, start: int = 0) -> bytes:
        """Everything written to stdout from byte ``start`` on."""
        size = self.stdout_size()
        return os.pread(self._out.fileno(), max(0, size - start), start) if size else b""  # type: ignore[union-attr]

    def error(self, what: str) -> ProcessError:
        """A ProcessError saying ``what`` went wrong, with the process's state and output tails."""
        rc = self.returncode
        state = "still running" if rc is None else f"exit code {rc}"
        return ProcessError(
            f"{self.name} (pid {self.popen.pid if self.popen else '-'}) {what}; {state}.\n"
            f"--- stderr tail ---\n{self.stderr_tail()}\n--- stdout tail ---\n{self.stdout_tail(1500)}"
        )

    # ------------------------------------------------------------- readiness
    async def wait_http(self, url: str, timeout: float = 15.0, status: int = 200) -> None:
        """Poll ``url`` until it answers ``status``; raise ProcessError if the
        process exits first or ``timeout`` seconds pass (the process is then
        left running: stop it in your teardown)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        client_timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            while True:
                if not self.running:
                    raise self.error(f"exited before {url} answered")
                try:
                    async with session.get(url) as resp:
                        if resp.status == status:
                            return
                        last = f"HTTP {resp.status}"
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise self.error(f"did not answer {status} on {url} within {timeout:g}s (last: {last})")
                await asyncio.sleep(0.05)

    async def wait_for(self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
        """Poll ``check()`` until it is true; ProcessError if the process exits first or
        ``timeout`` seconds pass (``what`` names the awaited condition in the message)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise self.error(f"exited before {what}")
            if await check():
                return
            if time.monotonic() >= deadline:
                raise self.error(f"did not get to {what} within {timeout:g}s")
            await asyncio.sleep(0.1)

    async def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
        """Wait until ``host:port`` accepts TCP connections (same errors as wait_http)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise self.error(f"exited before {host}:{port} accepted connections")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except (TimeoutError, OSError):
                if time.monotonic() >= deadline:
                    raise self.error(f"did not accept connections on {host}:{port} within {timeout:g}s") from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                return

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() >= deadline:
                raise self.error(f"did not exit within {timeout:g}s")
            await asyncio.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    # ------------------------------------------------------------ stopping
    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
        if self.running:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)  # a paused process handles SIGTERM only once resumed
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.running:
            return await self.kill()
        return self.returncode

    async def kill(self) -> int | None:
        """SIGKILL at once (a crash), and reap. Returns the exit code (-9)."""
        if self.popen is None:
            return None
        if self.running:
            self._signal(signal.SIGKILL)
        while self.popen.poll() is None:
            await asyncio.sleep(0.01)
        return self.returncode

    def stop_sync(self, timeout: float = 5.0) -> int | None:
        """Blocking variant of stop() for synchronous teardown code."""
        if self.popen is None:
            return None
        if self.running:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait()
        return self.returncode

    def pause(self) -> None:
        """SIGSTOP: the process holds its connections but does nothing until resume()."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        try:
            self.popen.send_signal(sig)  # type: ignore[union-attr]
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Close the captured-output files (after the process is gone)."""
        for f in {self._out, self._err}:
            if f is not None and not f.closed:
                f.close()

    async def __aenter__(self) -> ScriptProcess:
        if self.popen is None:
            self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        self.close()
