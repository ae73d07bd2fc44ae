"""`make bench`: the gateway's performance harness. One command, one table.

    .venv/bin/python -m bench.run                      # everything, < 5 minutes
    .venv/bin/python -m bench.run --quick              # shorter runs, ~1 minute
    .venv/bin/python -m bench.run --scenarios ceilings,authorize
    .venv/bin/python -m bench.run --scenario closed-256   # one scenario
    .venv/bin/python -m bench.run --profile api        # py-spy on gateway-api during its load
    .venv/bin/python -m bench.run --profile worker     # ... on gateway-worker (zero bank latency)

It builds the whole system itself through the system harness
(harness/system.py, bench/system.py): a private PostgreSQL database (schema
applied) and RabbitMQ vhost, `mockbank` (MOCKBANK_EXTRA_ACCOUNTS generated cards
with big balances, FAILURE_RATE=0, latency 0 unless a scenario sets it through
PUT /_mock/chaos), `gateway-api`, `gateway-relay` and `gateway-worker` as
subprocesses, and drives the load from this process with aiohttp, spreading
authorizations round-robin over the generated cards (the upstream bank
serialises per card). Everything it made is removed at the end.

Scenarios (those with the pipeline run in the order: closed-*, flash-sale, overload,
refusal-cost, e2e, capture, latency):
  ceilings   PostgreSQL: the API's submit transaction run directly with asyncpg
             (same SQL, same pool size and concurrency), a naive four-INSERT version,
             and two what-ifs: the same work as one statement, the same SQL without the
             outbox NOTIFY trigger; interleaved in rounds so noise hits all alike.
             RabbitMQ: publish-with-confirm and consume-ack rates (bench/ceilings.py).
  authorize  POST /v1/payments against gateway-api ALONE (relay and worker not
             started yet): closed loop at --clients, then open loop at half the
             closed-loop rate. Tables are emptied afterwards.
  e2e        relay and worker started; N authorizations at a fixed offered rate,
             bank latency 0; e2e auths/s = N / (last finished_at - first created_at).
             Then a probe at half the measured e2e rate (not saturated): the gateway's
             overhead per step from its own timestamps, and (full run) exact PostgreSQL
             commits per payment between two quiesced pg_stat readings.
  capture    captures of the payments e2e authorized: first at a fixed rate with the
             pipeline running (e2e rate), a probe at half that rate (overhead), then
             closed and open loop with the relay paused (API alone), then the rate at
             which the pipeline drains that backlog.
  latency    bank latency 100-2000 ms (the contract's default): authorizations at
             --latency-rate for one worker; completed auths/s, bank calls in flight,
             errors, timeouts (worker log), RSS growth.
  closed-64, closed-256, closed-1000
             admission as shipped: N FicMart-like aiohttp clients, each submits and
             long-polls (?wait=30) to final, over and over; refused (target 0),
             completed/s, CPU per completed authorization per part and summed
             (bench/checkouts.py, bench/cost.py). The admission scenarios run first
             among those with the pipeline, on fresh tables; c=64 is the headline.
  flash-sale 1000 clients submit 5000 payments at once, then long-poll them: refused
             (target 0), time until the last is final.
  overload   open loop at 3x the closed-256 rate (or a capacity measured first) for
             20 s from a lean client: goodput, accepted and refusal p99, answers.
  refusal-cost  the API's CPU per refused POST (all refused by a starved rate).

Always: peak RSS (VmHWM) per process, CPU ms per request/payment per process
(api, relay, worker, mockbank, the database's backends, RabbitMQ, this load
generator), results as JSON in bench/out/. --census adds PostgreSQL round trips,
transactions and AMQP publishes/acks per payment by process and statement
(bench/census.py); --profile adds py-spy's top functions (bench/profile.py).

What is measured how, and why: see bench/measure.py and bench/load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from bench import ceilings, checkouts, cost, load, measure, pinning
from bench import profile as profiling
from bench.plan import CLOSED, FULL, PIPELINE, PROFILE_PHASE, QUICK, parse
from bench.report import Report
from bench.system import BenchSystem, Options, Snapshot
from harness import services

OUT = Path(__file__).resolve().parent / "out"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.plan = QUICK if args.quick else FULL
        load.MAX_IN_FLIGHT = args.max_in_flight
        admin = os.environ.get("DATABASE_URL", services.LOCAL_DATABASE_URL)
        amqp = os.environ.get("AMQP_URL", services.LOCAL_AMQP_URL)
        worker_env = {}
        if args.worker_concurrency:
            worker_env["WORKER_CONCURRENCY"] = str(args.worker_concurrency)
        if args.worker_prefetch:
            worker_env["WORKER_PREFETCH"] = str(args.worker_prefetch)
        self.system = BenchSystem(
            Options(
                admin_url=admin,
                amqp_url=amqp,
                cards=args.cards,
                api_pool_size=args.db_pool_size,
                log_level=args.log_level,
                worker_env=worker_env,
                without_outbox_notify=args.without_outbox_notify,
                census=args.census,
                scale={"api": args.scale, "relay": args.scale, "worker": args.scale},
            )
        )
        self.report = Report(quick=args.quick, profile=args.profile)
        self._http: aiohttp.ClientSession | None = None
        self.cards: list[dict] = []
        self.api_xacts: float | None = None
        self.profiles: list[str] = []
        self.shipped: bool | None = False  # the API's admission as shipped (True), lifted, None: restart it
        self.capacity: float | None = None  # completed/s of the c=256 checkouts, when they ran

    @property
    def http(self) -> aiohttp.ClientSession:
        """The load generator's session: open while run() runs the scenarios."""
        assert self._http is not None, "no load session: scenarios run inside run()"
        return self._http

    # ---- helpers --------------------------------------------------------------------------

    def _profiling(self, phase: str) -> bool:
        if self.args.profile is None:
            return False
        # The first checkout scenario chosen, or the refusals, else the profiled process's own load.
        chosen = [s for s in self.args.chosen if s in CLOSED or s == "refusal-cost"]
        return phase == (chosen[0] if chosen else PROFILE_PHASE[self.args.profile])

    def _start_profile(self, phase: str) -> profiling.Recorder | None:
        if not self._profiling(phase):
            return None
        name = f"{self.args.profile}-{phase}{'-quick' if self.args.quick else ''}"
        out = OUT / f"{name}.txt"
        out.unlink(missing_ok=True)
        pid = self.system.pid(self.args.profile)
        assert pid is not None, f"{self.args.profile} is not running"
        print(f"  py-spy attached to {self.args.profile} (pid {pid}) -> {out}")
        return profiling.Recorder(pid, out, rate=self.args.profile_rate, native=self.args.profile_native)

    def _profiled(self, phase: str, title: str) -> Callable[[], AbstractAsyncContextManager] | None:
        """A profile of `phase` (reported as during `title`) to enter when its load starts, or
        None when it is not the one profiled."""
        if not self._profiling(phase):
            return None

        @contextlib.asynccontextmanager
        async def recording() -> AsyncIterator[None]:
            recorder = self._start_profile(phase)
            yield
            await self._stop_profile(recorder, title)

        return recording

    async def _stop_profile(self, recorder: profiling.Recorder | None, title: str) -> None:
        if recorder is None:
            return
        await recorder.stop()
        text = profiling.report(profiling.parse(recorder.out), f"profile of {self.args.profile} during {title}")
        self.profiles.append(text + f"\n  (collapsed stacks: {recorder.out}; open in speedscope.app)")

    async def _authorize_e2e(
        self, tag: str, rate: float, count: int, *, leased: bool = False
    ) -> tuple[load.LoadResult, measure.Completion, Snapshot, Snapshot]:
        """Submit `count` authorizations at `rate`/s and wait until all are final."""
        monitor = measure.Monitor(self.system, customer=f"cus_{tag}", leased=leased)
        src = load.authorize_source(tag, self.cards)

        def seen(sample: load.Sample) -> None:
            if sample.status == 202:
                monitor.accepted += 1

        before = await self.system.snapshot()
        monitor.start()
        res = await load.open_loop(self.http, self.system.api_url, src, rate, 0, count=count, on_sample=seen)
        completion = await monitor.wait_all_final(monitor.accepted, self.plan.final_timeout)
        after = await self.system.snapshot()
        return res, completion, before, after

    # ---- scenarios --------------------------------------------------------------------------

    async def run(self) -> None:
        t0 = time.perf_counter()
        load_avg = os.getloadavg()
        print(
            f"bench: scenarios {', '.join(self.args.chosen)}{' (quick)' if self.args.quick else ''}; "
            f"load average at start {load_avg[0]:.2f} on {os.cpu_count()} CPUs"
        )
        self.report.meta.update(cpus=os.cpu_count(), load_avg_start=load_avg[0], scenarios=self.args.chosen)
        try:
            await self.system.start("api")
            print(
                f"  database {self.system.database_name}, vhost {self.system.vhost}, "
                f"api {self.system.api_url}, bank {self.system.bank_url} ({time.perf_counter() - t0:.1f}s)"
            )
            self.cards = await self.system.bank.extra_accounts(self.args.cards)
            self.report.memory_mark("start", self.system.memory())
            async with load.session() as self._http:
                if "ceilings" in self.args.chosen:
                    await self.ceilings()
                    self.report.memory_mark("ceilings", self.system.memory())
                if "authorize" in self.args.chosen:
                    await self.authorize()
                    self.report.memory_mark("authorize", self.system.memory())
                if any(s in self.args.chosen for s in PIPELINE):
                    await self.system.clear_data()
                    await self.system.start("relay", "worker")
                    await self._authorize_e2e("warmup", 100, 100)  # every process warm, every pool connected
                    # The admission scenarios (checkouts, c=64 the headline) first, on tables as
                    # fresh as when they run alone: autovacuum is off on the CI machine
                    # (conf.d/90-ci.conf), so what the other scenarios leave behind would be
                    # counted in them (3.5 against 2.4 ms).
                    for scenario, clients in CLOSED.items():
                        if scenario in self.args.chosen:
                            await self.closed(clients)
                    if "flash-sale" in self.args.chosen:
                        await self.flash_sale()
                    if "overload" in self.args.chosen:
                        await self.overload()
                    if "refusal-cost" in self.args.chosen:
                        await self.refusal_cost()
                    # The capacity scenarios last: a backlog the latency scenario (bank at 100-2000
                    # ms) leaves would count in the admission's estimate of the time to final.
                    if any(s in self.args.chosen for s in ("e2e", "capture", "latency")):
                        await self._admission(shipped=False)  # they measure capacity: bounds lifted
                    if "e2e" in self.args.chosen:
                        await self.e2e()
                        self.report.memory_mark("e2e", self.system.memory())
                    if "capture" in self.args.chosen:
                        await self.capture()
                        self.report.memory_mark("capture", self.system.memory())
                    if "latency" in self.args.chosen:
                        await self.latency()
                        self.report.memory_mark("latency", self.system.memory())
            self.report.memory(self.system.memory())
            self.report.tables(await self.system.table_stats())
        finally:
            await self.system.close()
        self.report.meta["seconds"] = time.perf_counter() - t0
        print()
        print(self.report.render())
        for text in self.profiles:
            print()
            print(text)
        out = self.args.json or OUT / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.report.data, indent=1, default=str))
        print(f"\nresults: {out}   total {self.report.meta['seconds']:.0f}s")

    @contextlib.contextmanager
    def _pinned_if_asked(self) -> Iterator[str]:
        """--pin-api: the API processes running now and the load generator on a CPU of their own."""
        if not self.args.pin_api:
            yield ""
            return
        with pinning.api_alone(self.system) as pinned:
            print(f"  pinned: {pinned}")
            yield pinned

    async def _admission(self, *, shipped: bool) -> None:
        """The API restarted with every admission bound at its default (or lifted) and warmed
        up, unless it runs so already."""
        if self.shipped is not shipped:
            await self.system.admission(shipped=shipped)
            await cost.warm_up(self.system, self.http, self.cards)
            self.shipped = shipped

    async def closed(self, clients: int) -> None:
        count = self.plan.closed_counts[list(CLOSED.values()).index(clients)]
        print(f"closed-{clients}: {clients} checkout clients (submit, long-poll to final), {count} payments ...")
        await self._admission(shipped=True)
        recorder = self._start_profile(f"closed-{clients}")
        async with load.session(total_timeout=cost.WAIT + 30) as http:
            result = await checkouts.closed(
                self.system, http, self.cards, clients=clients, count=count, scale=self.args.scale
            )
        await self._stop_profile(recorder, f"{clients} checkout clients, submit + long poll to final")
        if clients == 256:
            self.capacity = result.census.rate
        self.report.sections.append((f"CHECKOUTS, CLOSED LOOP OF {clients} (admission as shipped)", result.table()))
        self.report.data[f"closed-{clients}"] = {
            "completed": result.census.completed,
            "per_second": result.census.rate,
            "refused": result.census.refused,
            "gateway_cpu_ms_per_payment": result.census.gateway_ms,
            "cpu_ms_per_payment": result.census.cpu_ms,
            "idle_cpu_ms_per_payment": result.census.idle_ms,
            "submit_to_final_ms": result.census.submit_to_final_ms,
            "scale": result.census.scale,
        }
        print("  " + result.table().replace("\n", "\n  "))
        self.system.check_alive()

    async def flash_sale(self) -> None:
        print("flash-sale: 1000 clients submit 5 payments each at once, then long-poll them to final ...")
        await self._admission(shipped=True)
        async with load.session(total_timeout=cost.WAIT + 30) as http:
            result = await checkouts.flash_sale(self.system, http, self.cards, clients=1000, per_client=5)
        self.report.sections.append(("FLASH SALE (admission as shipped)", result.table()))
        self.report.data["flash-sale"] = result.__dict__ | {
            "refused": dict(result.refused),
            "other": dict(result.other),
        }
        print("  " + result.table())
        self.system.check_alive()

    async def refusal_cost(self) -> None:
        print("refusal-cost: every POST refused (429), lean client, API CPU per refusal ...")
        result = await checkouts.refusal_cost(
            self.system,
            self.cards,
            count=5000 if self.args.quick else 20000,
            measuring=self._profiled("refusal-cost", "POST /v1/payments, every one refused"),
        )
        self.shipped = None  # restarted cold
        self.report.sections.append(("THE COST OF A REFUSAL (API CPU, from /proc)", result.table()))
        self.report.data["refusal-cost"] = {"api_cpu_ms": result.api_cpu_ms, "per_second": result.per_second}
        print("  " + result.table())
        self.system.check_alive()

    async def overload(self) -> None:
        seconds = self.plan.overload_seconds
        capacity = self.args.overload_capacity or self.capacity
        if capacity is None:
            print("overload: capacity (64 clients to final), then 3x that, open loop ...")
            with self._pinned_if_asked():
                capacity = await cost.capacity(self.system, self.http, self.cards)
        print(f"overload: 3x the capacity of {capacity:,.0f}/s, open loop, for {seconds:g} s ...")
        await self._admission(shipped=True)
        with self._pinned_if_asked() as pinned:
            result = await cost.overload(
                self.system,
                self.cards,
                capacity=capacity,
                factor=3.0,
                seconds=seconds,
                settle_timeout=120,
                connections=self.args.max_in_flight,
            )
        title = "OVERLOAD (3x the c=256 capacity, open loop, lean client)" + (f"; {pinned}" if pinned else "")
        self.report.sections.append((title, result.table()))
        self.report.data["overload"] = result.__dict__ | {"statuses": dict(result.statuses)}
        print("  " + result.table().replace("\n", "\n  "))
        self.system.check_alive()

    async def ceilings(self) -> None:
        print(
            "ceilings: PostgreSQL submit transaction (same SQL, naive 4 INSERTs, one statement, no NOTIFY), "
            "interleaved ..."
        )
        pool = self.args.db_pool_size or 20
        results = await ceilings.postgres(
            self.system.opts.admin_url,
            concurrency=self.args.clients,
            pool_size=pool,
            warmup=self.plan.ceiling_warmup,
            seconds=self.plan.ceiling_seconds,
            rounds=2 if self.args.quick else 4,
        )
        print("ceilings: RabbitMQ publish-confirm and consume-ack ...")
        results += await ceilings.rabbitmq(self.system.amqp_url, seconds=self.plan.ceiling_seconds / 2)
        for c in results:
            self.report.ceilings[c.name] = c
            print(f"  {c.name}: {c.rate:,.0f}/s")

    async def authorize(self) -> None:
        p = self.plan
        print(f"authorize: closed loop, {self.args.clients} clients, {p.warmup:g}+{p.seconds:g}s, API alone ...")
        recorder = self._start_profile("authorize")
        census0 = await self.system.census()
        closed = await load.closed_loop(
            self.http,
            self.system.api_url,
            load.authorize_source("acc", self.cards),
            self.args.clients,
            p.warmup,
            p.seconds,
            self.system.snapshot,
        )
        self.report.census(
            "authorize accept (API alone)", census0, await self.system.census(), closed.statuses().get(202, 0)
        )
        rate = closed.rate()
        print(f"  {rate:,.0f} accepted/s; open loop at {rate / 2:,.0f}/s for {p.open_seconds:g}s ...")
        opened = None
        if rate >= 2:
            opened = await load.open_loop(
                self.http,
                self.system.api_url,
                load.authorize_source("acc2", self.cards),
                rate / 2,
                p.open_seconds,
                self.system.snapshot,
                warmup=1.0,
            )
        await self._stop_profile(recorder, "POST /v1/payments, closed + open loop")
        self.api_xacts = self.report.accept("authorize", closed, opened)
        self.system.check_alive()

    async def e2e(self) -> None:
        rate, count = self.args.e2e_rate, self.plan.e2e_count
        print(f"e2e: {count} authorizations at {rate:g}/s, bank latency 0 ...")
        recorder = self._start_profile("e2e")
        census0 = await self.system.census()
        res, completion, before, after = await self._authorize_e2e("e2e", rate, count)
        self.report.census(
            "authorize end to end (API + pipeline)", census0, await self.system.census(), res.statuses().get(202, 0)
        )
        await self._stop_profile(recorder, f"e2e authorizations at {rate:g}/s, bank latency 0")
        st = await measure.steps(self.system, "authorize", customer="cus_e2e")
        self.report.e2e("authorize", res, completion, st, before, after)
        e2e_rate = st.rate
        print(f"  {e2e_rate:,.0f} auths/s end to end; overhead p99 {st.overhead_ms[99]:.1f} ms (saturated)")
        probe_rate = max(20.0, min(rate, e2e_rate) / 2)
        probe_count = int(probe_rate * self.plan.probe_seconds)
        quiesce = not self.args.quick
        if quiesce:
            print(f"e2e: quiet for {measure.QUIESCE:g}s so that every backend flushes its pg_stat counters ...")
            await asyncio.sleep(measure.QUIESCE)
            q0 = await self.system.snapshot()
        print(f"e2e: overhead probe, {probe_count} authorizations at {probe_rate:,.0f}/s ...")
        _, pcompletion, pbefore, pafter = await self._authorize_e2e("probe", probe_rate, probe_count)
        pst = await measure.steps(self.system, "authorize", customer="cus_probe")
        self.report.probe("authorize", probe_rate, pst, pbefore, pafter)
        if quiesce:
            await asyncio.sleep(measure.QUIESCE)
            q1 = await self.system.snapshot()
            self.report.quiesced("authorize", q0, q1, pst.count, pcompletion.polls, self.api_xacts)
        print(f"  overhead p50 {pst.overhead_ms[50]:.1f} ms, p99 {pst.overhead_ms[99]:.1f} ms")

    async def capture(self) -> None:
        """Accept runs first (relay paused: API alone), right after e2e's quiet period, so that
        no backend still holds unflushed pg_stat counters from earlier work; then the drain
        of that backlog, then captures at a fixed rate with the pipeline running, then a probe."""
        p = self.plan
        ids = [
            r["id"]
            for r in await self.system.db.fetch(
                "SELECT id FROM payments WHERE customer_id IN ('cus_e2e', 'cus_probe') AND status = 'authorized' "
                "ORDER BY created_at"
            )
        ]
        rate = self.args.capture_rate
        at_rate, ids = ids[: p.capture_rate_count], ids[p.capture_rate_count :]
        probe_n = min(len(ids) // 4, int(rate / 2 * p.probe_seconds))
        probe_ids, ids = ids[:probe_n], ids[probe_n:]
        if len(at_rate) < 50 or len(ids) < 100:
            print(f"capture: too few authorized payments ({len(at_rate) + len(ids)}); skipped")
            return

        # API alone: relay paused, so no capture reaches a worker until the drain below.
        split = len(ids) * 2 // 3
        closed_ids, open_ids = ids[:split], ids[split:]
        print(f"capture: closed loop over {len(closed_ids)} payments, relay paused ...")
        self.system.pause("relay")
        try:
            closed = await load.closed_loop(
                self.http,
                self.system.api_url,
                load.action_source("capture", closed_ids),
                self.args.clients,
                min(0.5, p.warmup),
                p.seconds,
                self.system.snapshot,
            )
            crate = closed.rate()
            opened = None
            if crate >= 2:
                secs = len(open_ids) / (crate / 2)
                print(
                    f"  {crate:,.0f} accepted/s; open loop at {crate / 2:,.0f}/s over {len(open_ids)} payments "
                    f"({secs:.1f}s) ..."
                )
                opened = await load.open_loop(
                    self.http,
                    self.system.api_url,
                    load.action_source("capture", open_ids),
                    crate / 2,
                    secs,
                    self.system.snapshot,
                    warmup=min(1.0, secs / 4),
                )
        finally:
            self.system.resume("relay")
        self.report.accept("capture", closed, opened)
        backlog = [s for s in closed.samples + (opened.samples if opened else []) if s.status == 202]
        print(f"capture: relay resumed, draining {len(backlog)} captures ...")
        drain = measure.Monitor(self.system, ids=closed_ids + open_ids, in_progress="capturing")
        t_resume = time.perf_counter()
        drain.start()
        done = await drain.wait_all_final(len(backlog), p.final_timeout)
        drain_s = (done.ticks[-1].at - t_resume) if done.ticks else float("nan")
        print(f"  backlog of {len(backlog)} drained at {len(backlog) / drain_s:,.0f}/s")

        print(f"capture: {len(at_rate)} captures at {rate:g}/s, pipeline running ...")
        monitor = measure.Monitor(self.system, ids=at_rate, in_progress="capturing")

        def seen(sample: load.Sample) -> None:
            if sample.status == 202:
                monitor.accepted += 1

        census0 = await self.system.census()
        before = await self.system.snapshot()
        monitor.start()
        res = await load.open_loop(
            self.http,
            self.system.api_url,
            load.action_source("capture", at_rate),
            rate,
            0,
            count=len(at_rate),
            on_sample=seen,
        )
        completion = await monitor.wait_all_final(monitor.accepted, p.final_timeout)
        after = await self.system.snapshot()
        self.report.census(
            "capture end to end (API + pipeline)", census0, await self.system.census(), res.statuses().get(202, 0)
        )
        st = await measure.steps(self.system, "capture", ids=at_rate)
        print(f"  {st.rate:,.0f} captures/s end to end")
        probe_rate = max(20.0, min(rate, st.rate) / 2)
        probe_ids = probe_ids[: max(20, int(probe_rate * p.probe_seconds))]
        if len(probe_ids) >= 20:
            print(f"capture: overhead probe, {len(probe_ids)} captures at {probe_rate:,.0f}/s ...")
            pmon = measure.Monitor(self.system, ids=probe_ids, in_progress="capturing")
            pbefore = await self.system.snapshot()
            pmon.start()
            pres = await load.open_loop(
                self.http,
                self.system.api_url,
                load.action_source("capture", probe_ids),
                probe_rate,
                0,
                count=len(probe_ids),
            )
            await pmon.wait_all_final(pres.statuses().get(202, 0), p.final_timeout)
            pafter = await self.system.snapshot()
            pst = await measure.steps(self.system, "capture", ids=probe_ids)
            self.report.probe("capture", probe_rate, pst, pbefore, pafter)
            print(f"  overhead p50 {pst.overhead_ms[50]:.1f} ms, p99 {pst.overhead_ms[99]:.1f} ms")
        self.report.e2e("capture", res, completion, st, before, after, drain=(len(backlog), drain_s, done.timed_out))

    async def latency(self) -> None:
        rate, secs = self.args.latency_rate, self.plan.latency_seconds
        count = int(rate * secs)
        print(f"latency: bank 100-2000 ms, {count} authorizations at {rate:g}/s ...")
        await self.system.bank.chaos(min_latency_ms=100, max_latency_ms=2000)
        mem0 = self.system.memory()
        log0 = self.system.procs["worker"].stdout_size()
        try:
            res, completion, before, after = await self._authorize_e2e("lat", rate, count, leased=True)
        finally:
            await self.system.bank.chaos(min_latency_ms=0, max_latency_ms=0)
        mem1 = self.system.memory()
        st = await measure.steps(self.system, "authorize", customer="cus_lat")
        events = measure.log_events(self.system.procs["worker"].read_stdout(log0))
        self.report.latency(res, completion, st, before, after, mem0, mem1, events)
        print(f"  {st.steady_rate:,.0f} auths/s steady; {len(st.finished_in)}/{count} final")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv, __doc__)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(Bench(args).run())
    else:
        uvloop.run(Bench(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
