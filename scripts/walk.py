"""A capture walked through the worker as data: which project modules a reader passes through.

    .venv/bin/python -m scripts.walk    # DATABASE_URL, AMQP_URL: the servers (default: the local ones)

In a private database and RabbitMQ vhost, with the mock bank as a process (zero latency, no
failures) and the real relay and worker in this process (worker.relay.Relay,
worker.consumer.Worker), a payment is authorized (not measured), then captured. From the call
of Worker._handle for the capture's command to the end of that handling (after its ack),
sys.setprofile records every call into a file under gateway/ or worker/ made by that handling
(and the batches it starts); a coroutine resumed after an await is not a new call.

Printed: the modules entered, distinct; the stops (each change of module from one call to the
next); the calls back up (a call into a module that is already lower on the stack, made from
another module: a callback, which sends a reader back up to a module they came from); the walk
without the leaves, and its returns (a module entered again after the walk had left it for
another one, marked ^: mostly handling calling its next step once a call it made is over, the
story going on where it was); how often each module was entered.

Leaves are the modules a reader consults and comes back from without the walk going anywhere
from them: the domain's rules (gateway/domain/, pure), the store and its SQL (gateway/store/,
gateway/sql/), the generic group commit (gateway/batching.py, which runs the callable it is
given), and utilities that decide nothing about the payment: logs, timefmt, messages, redact,
tracing, crashpoints, db, process, views (the receipt's serializer), cards (the vault), answers
(a bank answer checked against the request), worker/breaker.py (the breaker's state machine),
worker/delivery.py (the broker side of the message: ack, publish to a retry queue),
worker/metrics.py (counters) and worker/settings.py (values). Not leaves: what decides the
capture's way, worker/db_pause.py and worker/bank_gate.py included (whether a handling may go on).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
import uuid
from collections import Counter
from collections.abc import Coroutine, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import asyncpg

from gateway import config, db, logs
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import Action
from gateway.payments import intake
from harness import services
from harness.procs import ScriptProcess, free_port
from worker.consumer import Worker
from worker.relay import Relay
from worker.settings import RelaySettings, WorkerSettings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway/", "worker/")
LEAF_FOLDERS = ("gateway/domain/", "gateway/store/", "gateway/sql/")
LEAF_FILES = frozenset(
    f"gateway/{name}.py"
    for name in (
        "batching",
        "logs",
        "timefmt",
        "messages",
        "redact",
        "tracing",
        "crashpoints",
        "db",
        "process",
        "views",
        "cards",
        "answers",
    )
) | {"worker/breaker.py", "worker/delivery.py", "worker/metrics.py", "worker/settings.py"}
# The mock bank's test card that it approves (docs/bank.md).
CARD = intake.CardInput(number="4111111111111111", cvv="123", expiry_month=12, expiry_year=2030)


def project_module(frame: FrameType) -> str | None:
    """The frame's file, relative to the repository, if it is one of gateway/ or worker/."""
    path = Path(frame.f_code.co_filename)
    if path.is_relative_to(ROOT) and path.relative_to(ROOT).as_posix().startswith(PACKAGES):
        return path.relative_to(ROOT).as_posix()
    return None


def _callers(frame: FrameType) -> Iterator[FrameType]:
    """The frames below `frame` on its stack (for a coroutine, the chain that awaits it)."""
    caller = frame.f_back
    while caller is not None:
        yield caller
        caller = caller.f_back


def is_leaf(module: str) -> bool:
    return module.startswith(LEAF_FOLDERS) or module in LEAF_FILES


class Recorder:
    """The project modules entered by calls, in order, while it records: the calls of the task
    in which the consumer handles a message (Worker._handle) and of the tasks it starts (a
    batch of claims or outcomes), not those of the relay or of the worker's periodic tasks."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        # Calls into a module (not a leaf) that is already below on the stack, from another
        # module: a callback, the walk climbing back up to a caller (caller -> module called).
        self.callbacks: list[tuple[str, str]] = []
        self._root: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        # Frames seen, kept alive so that no id is reused: one seen again is a coroutine resumed.
        self._frames: dict[int, FrameType] = {}

    def _call(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or self._frames.get(id(frame)) is frame:
            return
        self._frames[id(frame)] = frame
        if frame.f_code is Worker._handle.__code__ and self._root is None:
            self._root = asyncio.current_task()
            if self._root is not None:
                self._tasks.add(self._root)
        if asyncio.current_task() not in self._tasks:
            return
        module = project_module(frame)
        if module is None:
            return
        self.calls.append(module)
        callers = [m for m in map(project_module, _callers(frame)) if m is not None]
        if not is_leaf(module) and callers and callers[0] != module and module in callers:
            self.callbacks.append((callers[0], module))

    def _task(
        self, loop: asyncio.AbstractEventLoop, coro: Generator[Any, None, T] | Coroutine[Any, Any, T], /, **context: Any
    ) -> asyncio.Task[T]:
        task = asyncio.Task(coro, loop=loop, **context)
        if asyncio.current_task() in self._tasks:
            self._tasks.add(task)
        return task

    async def handled(self) -> None:
        """Until the handling that was recorded has ended (after its ack)."""
        if self._root is None:
            raise SystemExit("no command was handled")
        await self._root

    @contextmanager
    def recording(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(self._task)
        sys.setprofile(self._call)
        try:
            yield
        finally:
            sys.setprofile(None)
            loop.set_task_factory(None)


def collapsed(modules: list[str]) -> list[str]:
    """One entry per run of calls in the same module."""
    return [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]


@dataclass(frozen=True)
class Figures:
    distinct: int
    stops: int
    walk: list[str]  # without the leaves, one entry per stop
    returns: int
    entered: Counter[str]
    callbacks: Counter[tuple[str, str]]

    @classmethod
    def of(cls, recorder: Recorder) -> Figures:
        calls = recorder.calls
        stops = collapsed(calls)
        walk = collapsed([m for m in calls if not is_leaf(m)])
        returns = sum(1 for i, m in enumerate(walk) if m in walk[:i])
        return cls(len(set(calls)), len(stops) - 1, walk, returns, Counter(stops), Counter(recorder.callbacks))


async def final(pool: asyncpg.Pool, payment_id: str, status: str) -> None:
    """Wait until the payment is in `status` (the worker recorded the bank's answer)."""
    async with asyncio.timeout(30):
        while await pool.fetchval("SELECT status FROM payments WHERE id = $1", payment_id) != status:
            await asyncio.sleep(0.02)


def request(path: str) -> intake.IdempotentRequest:
    return intake.IdempotentRequest("ficmart", uuid.uuid4().hex, "POST", path, ("walk",))


async def capture_walk(pool: asyncpg.Pool, vault: CardVault) -> Recorder:
    """A payment authorized through the pipeline, then captured while recording: the modules
    the capture's handling entered."""
    submission = intake.authorization(
        vault, request("/v1/payments"), order_id=uuid.uuid4().hex, customer_id="cus_walk", amount=5000, card=CARD
    )
    (recorded,) = await intake.submit_many(pool, [submission])
    if not recorded["inserted"]:
        raise SystemExit("the authorization was not recorded")
    payment_id = submission.payment_id
    await final(pool, payment_id, "authorized")
    recorder = Recorder()
    with recorder.recording():
        asked = intake.action_request(request(f"/v1/payments/{payment_id}/capture"), payment_id, Action.CAPTURE, None)
        (answer,) = await intake.request_actions(pool, [asked])
        if not isinstance(answer, intake.Response):
            raise SystemExit(f"the capture was refused: {answer!r}")
        await final(pool, payment_id, "captured")
        await recorder.handled()
    return recorder


async def walk(database_url: str, amqp_url: str) -> Recorder:
    """A private database and vhost, the mock bank as a process, relay and worker in this one."""
    port, card_key = free_port(), os.urandom(32)
    bank_env = {"MIN_LATENCY_MS": "0", "MAX_LATENCY_MS": "0", "FAILURE_RATE": "0", "LOG_LEVEL": "warning"}
    with services.private_vhost(amqp_url) as vhost_url:
        async with (
            services.private_database(database_url) as url,
            ScriptProcess("mockbank", "--port", str(port), env=bank_env) as bank,
        ):
            bank_url = f"http://127.0.0.1:{port}"
            await bank.wait_http(f"{bank_url}/health")
            settings = config.parse(
                {
                    "DATABASE_URL": url,
                    "AMQP_URL": vhost_url,
                    "BANK_URL": bank_url,
                    "CARD_ENCRYPTION_KEY": base64.b64encode(card_key).decode(),
                    "GATEWAY_ENV": "development",
                    "LOG_LEVEL": "warning",
                },
                uses_card_key=True,
            )
            cfg = WorkerSettings.parse({})
            relay = Relay(url, vhost_url, RelaySettings.parse({"RELAY_POLL_SECONDS": "0.05"}), cfg.retry_ladder)
            worker = Worker(settings, cfg, worker_id="walk", run_sweeper=False)
            pool = await db.create_pool(url, min_size=1, max_size=2)
            stop = asyncio.Event()
            try:
                await relay.start()
                relaying = asyncio.create_task(relay.run(stop))
                await worker.start()
                return await capture_walk(pool, CardVault([CardKey(SINGLE_KEY_ID, card_key)]))
            finally:
                stop.set()
                await worker.stop()
                with contextlib.suppress(Exception):
                    await relaying
                await relay.close()
                await pool.close()


def report(figures: Figures) -> str:
    lines = [
        f"modules entered (distinct): {figures.distinct}",
        f"stops (module changes):     {figures.stops}",
        f"calls back up (callbacks):  {sum(figures.callbacks.values())}",
        *(f"  {count:3d}  {caller} -> {called}" for (caller, called), count in figures.callbacks.most_common()),
        f"returns (leaves aside):     {figures.returns}",
        "walk, leaves aside:",
        *(f"  {'^ ' if module in figures.walk[:i] else '  '}{module}" for i, module in enumerate(figures.walk)),
        "entered (times):",
        *(f"  {count:3d}  {module}" for module, count in figures.entered.most_common()),
    ]
    return "\n".join(lines)


def main() -> None:
    logs.setup("warning", "walk")
    database_url = os.environ.get("DATABASE_URL", services.LOCAL_DATABASE_URL)
    amqp_url = os.environ.get("AMQP_URL", services.LOCAL_AMQP_URL)
    print(report(Figures.of(asyncio.run(walk(database_url, amqp_url)))))


if __name__ == "__main__":
    main()
