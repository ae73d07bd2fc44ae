"""The one table `make bench` prints: figures, their ceilings, targets, MET / NOT MET."""

from __future__ import annotations

import math
from collections import Counter

from bench import measure
from bench.load import LoadResult
from bench.system import Snapshot

TARGET_E2E = 500.0  # auths/s end to end at zero bank latency
TARGET_LATENCY = 400.0  # auths/s per worker at the default bank latency
TARGET_OPEN_P99 = 50.0  # ms, accept latency at half the closed-loop rate
PG_STAT_MIN_WINDOW = 2.0  # s: a window shorter than two pg_stat flushes gives no commit count
TARGET_OVERHEAD_P99 = 25.0  # ms, the gateway's own time per step
TARGET_RSS_MB = 150.0
TARGET_COST_MS = 3.0  # gateway CPU per completed authorization (issue 9)
TARGET_OVERLOAD_ACCEPTED_P99 = 250.0  # ms, at 3x capacity (issue 20)
TARGET_OVERLOAD_REFUSED_P99 = 50.0  # ms, at 3x capacity
TARGET_OVERLOAD_GOODPUT = 0.8  # accepted / time until the last is final, in capacities
TARGET_REFUSAL_CPU_MS = 0.1  # the API's CPU per refused POST, HTTP included
ROLE_ORDER = ("api", "relay", "worker", "mockbank", "postgres", "rabbitmq", "loadgen")


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _r(v) -> str:
    return "-" if _nan(v) else f"{v:,.0f}"


def _ms(d: dict | None) -> str:
    if not d:
        return "-"
    return " / ".join("-" if _nan(d.get(q)) else f"{d[q]:,.1f}" for q in (50, 99, 99.9) if q in d)


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("MET" if ok else "NOT MET")


class Report:
    def __init__(self, *, quick: bool, profile: str | None):
        self.meta: dict = {"quick": quick, "profile": profile}
        self.ceilings: dict = {}
        self.rows: list[tuple[str, str, str, str, str] | str] = []
        self.data: dict = {"meta": self.meta, "ceilings": {}, "results": {}}
        self._accept: dict[str, dict] = {}
        self._sections: dict[str, list] = {}
        self._mem: dict = {}
        self._mem_marks: list[tuple[str, dict]] = []
        self._cpu: dict[str, dict[str, tuple]] = {}
        self._census: dict[str, dict[str, dict[str, float]]] = {}
        self._probes: dict[str, dict] = {}
        self.sections: list[tuple[str, str]] = []  # (title, text): printed before the table

    # ---- collecting ---------------------------------------------------------------------------

    def accept(self, kind: str, closed: LoadResult, opened: LoadResult | None) -> float | None:
        """Accept figures of one action; returns PostgreSQL commits per accepted request."""
        accepted = len(closed.accepted())
        xacts = None
        if accepted and closed.before is not None:
            xacts = (closed.after.xact_commit - closed.before.xact_commit) / accepted
            self._cpu[f"{kind} accept (closed loop)"] = measure.cpu_per_item(closed.before, closed.after, accepted)
        d = {
            "closed_clients": closed.peak_in_flight,
            "closed_rate": closed.rate(),
            "closed_window_s": closed.seconds,
            "closed_latency_ms": closed.latency_ms(),
            "closed_statuses": dict(closed.statuses()),
            "xacts_per_request": xacts,
        }
        if opened is not None:
            d.update(
                open_rate=opened.offered_rate,
                open_latency_ms=opened.latency_ms(),
                open_statuses=dict(opened.statuses()),
                open_peak_in_flight=opened.peak_in_flight,
                open_achieved=len(opened.accepted()) / opened.seconds if opened.seconds else None,
            )
        self._accept[kind] = d
        self.data["results"][f"{kind}_accept"] = d
        return xacts

    def e2e(
        self,
        kind: str,
        res: LoadResult,
        completion: measure.Completion,
        st: measure.Steps,
        before: Snapshot,
        after: Snapshot,
        drain: tuple | None = None,
    ) -> None:
        d = {
            "offered_rate": res.offered_rate,
            "submitted": len(res.samples),
            "statuses": dict(res.statuses()),
            "client_peak_open": res.peak_in_flight,
            "client_waited": res.waited_for_slot,
            "count": st.count,
            "final_statuses": dict(st.statuses),
            "timed_out": completion.timed_out,
            "rate_makespan": st.rate,
            "makespan_s": st.makespan_s,
            "final": len(st.finished_in),
            "steady_rate": st.steady_rate,
            "total_ms": st.total_ms,
            "overhead_ms": st.overhead_ms,
            "dispatch_ms": st.dispatch_ms,
            "settle_ms": st.settle_ms,
            "bank_ms": st.bank_ms,
            "attempts_over_1": st.attempts_over_1,
            "accept_latency_ms": res.latency_ms(),
        }
        if drain is not None:
            n, secs, timed_out = drain
            d["drain"] = {"count": n, "seconds": secs, "rate": n / secs if secs else None, "timed_out": timed_out}
        self._sections[kind] = d
        self.data["results"][f"{kind}_e2e"] = d
        self._cpu[f"{kind} e2e (per payment, whole phase)"] = measure.cpu_per_item(before, after, st.count)

    def latency(
        self,
        res: LoadResult,
        completion: measure.Completion,
        st: measure.Steps,
        before: Snapshot,
        after: Snapshot,
        mem0: dict,
        mem1: dict,
        events: Counter,
    ) -> None:
        leased = [t.leased for t in completion.ticks if t.leased is not None]
        d = {
            "offered_rate": res.offered_rate,
            "submitted": len(res.samples),
            "statuses": dict(res.statuses()),
            "client_peak_open": res.peak_in_flight,
            "client_waited": res.waited_for_slot,
            "count": st.count,
            "final": len(st.finished_in),
            "final_statuses": dict(st.statuses),
            "timed_out": completion.timed_out,
            "steady_rate": st.steady_rate,
            "rate_makespan": st.rate,
            "in_flight_max_sampled": max(leased) if leased else None,
            "in_flight_little": st.in_flight_little,
            "total_ms": st.total_ms,
            "overhead_ms": st.overhead_ms,
            "dispatch_ms": st.dispatch_ms,
            "settle_ms": st.settle_ms,
            "bank_ms": st.bank_ms,
            "attempts_over_1": st.attempts_over_1,
            "worker_log": dict(events),
            "accept_latency_ms": res.latency_ms(),
            "worker_rss_kb": {
                "before": mem0.get("worker", (None, None))[0],
                "after": mem1.get("worker", (None, None))[0],
                "peak": mem1.get("worker", (None, None))[1],
            },
        }
        self._sections["latency"] = d
        self.data["results"]["latency"] = d
        self._cpu["latency (per payment, whole phase)"] = measure.cpu_per_item(before, after, st.count)

    def probe(self, kind: str, rate: float, st: measure.Steps, before: Snapshot, after: Snapshot) -> None:
        """Per-step overhead at an offered rate the pipeline sustains (half its measured e2e rate)."""
        d = {
            "offered_rate": rate,
            "count": st.count,
            "overhead_ms": st.overhead_ms,
            "dispatch_ms": st.dispatch_ms,
            "settle_ms": st.settle_ms,
            "bank_ms": st.bank_ms,
            "total_ms": st.total_ms,
            "final_statuses": dict(st.statuses),
        }
        self._probes[kind] = d
        self.data["results"][f"{kind}_overhead_probe"] = d
        self._cpu[f"{kind} e2e, not saturated (probe)"] = measure.cpu_per_item(before, after, st.count)

    def quiesced(self, kind: str, q0: Snapshot, q1: Snapshot, count: int, polls: int, api: float | None) -> None:
        """Exact commits per payment between two quiesced snapshots around the probe."""
        if not count:
            return
        total = (q1.xact_commit - q0.xact_commit - polls) / count
        d = {
            "total_per_payment": total,
            "api_per_request": api,
            "seconds": q1.at - q0.at,
            "rollbacks": q1.xact_rollback - q0.xact_rollback,
        }
        if api is not None:
            d["pipeline_per_payment"] = total - api
        self._probes.setdefault(kind, {})["xacts"] = d
        self.data["results"][f"{kind}_overhead_probe"]["xacts"] = d

    def census(self, label: str, before: dict, after: dict, items: int) -> None:
        """Round trips and messages per payment by process (bench --census)."""
        if not items or not after:
            return
        per = {}
        for role, counts in after.items():
            old = before.get(role, {})
            per[role] = {k: (v - old.get(k, 0)) / items for k, v in counts.items() if v - old.get(k, 0)}
        self._census[label] = per
        self.data["results"].setdefault("census", {})[label] = per

    def memory_mark(self, after: str, mem: dict) -> None:
        self._mem_marks.append((after, mem))
        self.data["results"].setdefault("memory_marks_kb", {})[after] = {
            k: {"rss": v[0], "peak": v[1]} for k, v in mem.items()
        }

    def tables(self, rows: list[dict]) -> None:
        self.data["results"]["tables"] = rows
        vac = [
            f"{r['relname']} {r['autovacuum_count']}/{r['autoanalyze_count']}"
            for r in rows
            if r["autovacuum_count"] or r["autoanalyze_count"]
        ]
        self.meta["autovacuum"] = ", ".join(vac) if vac else "none"

    def memory(self, mem: dict) -> None:
        self._mem = mem
        self.data["results"]["memory_kb"] = {k: {"rss": v[0], "peak": v[1]} for k, v in mem.items()}

    # ---- rendering ----------------------------------------------------------------------------

    def _row(self, metric: str, figure: str, ceiling: str = "", target: str = "", verdict: str = "") -> None:
        self.rows.append((metric, figure, ceiling, target, verdict))

    def _ceil(self, name: str) -> float | None:
        c = self.ceilings.get(name)
        return c.rate if c is not None else None

    def render(self) -> str:
        self.rows = []
        self.data["ceilings"] = {
            k: {"rate": c.rate, "ops": c.ops, "seconds": c.seconds, "latency_ms": c.latency_ms, "note": c.note}
            for k, c in self.ceilings.items()
        }
        same, naive = self._ceil("pg_same_sql"), self._ceil("pg_naive_4rt")
        pub, con = self._ceil("rabbit_publish_confirm"), self._ceil("rabbit_consume_ack")

        if self.ceilings:
            self.rows.append("CEILINGS (this machine, this run)")
            labels = {
                "pg_same_sql": "PG submit, SAME SQL as authorize() (one statement)",
                "pg_naive_4rt": "PG submit txn, naive 4 INSERTs (reference)",
                "pg_same_sql_no_notify": "PG same SQL, outbox NOTIFY trigger dropped (diag.)",
                "rabbit_publish_confirm": "RabbitMQ publish + confirm, persistent, quorum queue",
                "rabbit_consume_ack": "RabbitMQ consume + ack",
            }
            for name, c in self.ceilings.items():
                lat = f"p50/p99/p99.9 {_ms(c.latency_ms)} ms" if c.latency_ms else ""
                self._row(labels.get(name, name), f"{_r(c.rate)}/s", lat, c.note)

        for kind in ("authorize", "capture"):
            a = self._accept.get(kind)
            e = self._sections.get(kind)
            if not a and not e:
                continue
            path = "POST /v1/payments" if kind == "authorize" else "POST /v1/payments/{id}/capture"
            self.rows.append(f"{kind.upper()}  ({path})")
            if a:
                rate = a["closed_rate"]
                frac = []
                if same:
                    frac.append(f"{rate / same:.2f} of same-SQL")
                if naive:
                    frac.append(f"{rate / naive:.2f} of naive-4RT")
                ok = rate >= naive if naive else None
                alone = "API alone" if kind == "authorize" else "API alone, relay paused"
                self._row(
                    f"accepted/s, closed loop {a['closed_clients']} clients ({alone})",
                    f"{_r(rate)}/s",
                    ", ".join(frac),
                    f">= naive 4RT ({_r(naive)}/s)" if naive else ">= naive 4RT (not run)",
                    _verdict(ok),
                )
                self._row("  accept latency p50/p99/p99.9 ms, closed loop", _ms(a["closed_latency_ms"]))
                if "open_latency_ms" in a:
                    p99 = a["open_latency_ms"].get(99)
                    self._row(
                        f"  accept latency p50/p99/p99.9 ms, open loop {_r(a['open_rate'])}/s",
                        _ms(a["open_latency_ms"]),
                        "",
                        f"p99 < {TARGET_OPEN_P99:g} ms",
                        _verdict(None if _nan(p99) else p99 < TARGET_OPEN_P99),
                    )
                bad = {k: v for k, v in a["closed_statuses"].items() if k != 202}
                bad_open = {k: v for k, v in a.get("open_statuses", {}).items() if k != 202}
                if bad or bad_open:
                    self._row("  non-202 answers / client errors", f"closed {bad} open {bad_open}")
                if a["xacts_per_request"] is not None:
                    approx = kind == "capture" and self.meta.get("quick")
                    # A backend sends its pg_stat counters at most once a second: a shorter
                    # window (captures run out of authorized payments) may have seen none yet.
                    short = a["closed_window_s"] < PG_STAT_MIN_WINDOW
                    self._row(
                        "  PG commits per accepted request (pg_stat_database)",
                        "n/a" if short else f"{a['xacts_per_request']:.2f}",
                        f"window {a['closed_window_s']:.1f}s"
                        + (f"; under {PG_STAT_MIN_WINDOW:g} s pg_stat may not have flushed" if short else "")
                        + ("; approx.: earlier work may still flush (quick run has no quiet period)" if approx else ""),
                    )
            if e:
                rate = e["rate_makespan"]
                what = "auths" if kind == "authorize" else "captures"
                target = TARGET_E2E if kind == "authorize" else None
                self._row(
                    f"end-to-end {what}/s, bank 0 ms ({e['count']} at {_r(e['offered_rate'])}/s offered, saturated)",
                    f"{_r(rate)}/s",
                    f"steady {_r(e['steady_rate'])}/s",
                    f">= {TARGET_E2E:g}/s" if target else "",
                    _verdict(rate >= target if target and rate else None),
                )
                if e.get("timed_out"):
                    self._row("  NOT ALL FINAL before the timeout", str(e["final_statuses"]))
                pr = self._probes.get(kind)
                if pr:
                    p99 = pr["overhead_ms"].get(99)
                    self._row(
                        f"  gateway overhead per step p50/p99/p99.9 ms, {_r(pr['offered_rate'])}/s offered",
                        _ms(pr["overhead_ms"]),
                        "half the e2e rate: not saturated",
                        f"p99 < {TARGET_OVERHEAD_P99:g} ms",
                        _verdict(None if _nan(p99) else p99 < TARGET_OVERHEAD_P99),
                    )
                    self._row("    dispatch: API commit -> relay -> broker -> worker claim", _ms(pr["dispatch_ms"]))
                    self._row("    settle: claim -> record_outcome commit, less bank_ms", _ms(pr["settle_ms"]))
                    self._row("    bank_ms (mock bank at 0 ms chaos; includes the HTTP client)", _ms(pr["bank_ms"]))
                self._row(
                    f"  overhead p50/p99/p99.9 ms at {_r(e['offered_rate'])}/s offered (saturated)",
                    _ms(e["overhead_ms"]),
                    f"dispatch {_ms(e['dispatch_ms'])}",
                )
                self._row(
                    "  accept latency p50/p99/p99.9 ms, pipeline running (saturated)",
                    _ms(e["accept_latency_ms"]),
                    f"client: {e['client_peak_open']} open at most, {e['client_waited']} waited",
                )
                x = (pr or {}).get("xacts")
                if x:
                    fig = f"{x['total_per_payment']:.2f}"
                    if "pipeline_per_payment" in x:
                        fig += f" ({x['api_per_request']:.2f} API + {x['pipeline_per_payment']:.2f} relay/worker)"
                    self._row(
                        "  PG commits per payment, whole pipeline (quiesced pg_stat)",
                        fig,
                        "incl. LISTEN wake-up reads (see --census)",
                    )
                elif kind == "authorize":
                    self._row("  PG commits per payment, whole pipeline", "(full run only: needs quiesced pg_stat)")
                msgs = 2  # one command + one completion event published per step
                if pub and rate:
                    self._row(
                        "  broker: publishes (command+event) per s / publish ceiling",
                        f"{_r(rate * msgs)}/s",
                        f"{rate * msgs / pub:.2f} of publish ceiling",
                    )
                if con and rate:
                    self._row(
                        "  broker: consumes per s / consume ceiling",
                        f"{_r(rate)}/s",
                        f"{rate / con:.2f} of consume ceiling",
                    )
                cpu = self._cpu.get(f"{kind} e2e (per payment, whole phase)", {})
                bounds = [
                    f"{role} {1000 / cpu[role][0]:,.0f}/s"
                    for role in ("api", "relay", "worker")
                    if role in cpu and cpu[role][0] > 0
                ]
                if bounds:
                    self._row(
                        "  one-core bound per process (1000 / its CPU ms per payment)",
                        ", ".join(bounds),
                        "where a process would saturate with a core to itself",
                    )
                if "drain" in e:
                    dr = e["drain"]
                    self._row(
                        f"  backlog drain after the relay resumed ({dr['count']} captures)",
                        f"{_r(dr['rate'])}/s",
                        "timed out" if dr["timed_out"] else f"{dr['seconds']:.1f}s",
                    )
                non_final = {k: v for k, v in e["final_statuses"].items() if k not in ("authorized", "captured")}
                if non_final or e["attempts_over_1"]:
                    self._row("  other outcomes / operations retried", f"{non_final} / {e['attempts_over_1']}")

        lat = self._sections.get("latency")
        if lat:
            self.rows.append("DEFAULT BANK LATENCY 100-2000 ms (one worker)")
            rate = lat["steady_rate"]
            self._row(
                f"completed auths/s ({lat['count']} at {_r(lat['offered_rate'])}/s offered)",
                f"{_r(rate)}/s",
                f"overall {_r(lat['rate_makespan'])}/s",
                f">= {TARGET_LATENCY:g}/s per worker",
                _verdict(None if _nan(rate) else rate >= TARGET_LATENCY),
            )
            self._row(
                "  accept latency p50/p99/p99.9 ms at this offered rate",
                _ms(lat["accept_latency_ms"]),
                f"client: {lat['client_peak_open']} open at most, {lat['client_waited']} waited",
            )
            self._row(
                "  bank calls in flight (max sampled leases / Little's law)",
                f"{_r(lat['in_flight_max_sampled'])} / {_r(lat['in_flight_little'])}",
            )
            p99 = lat["overhead_ms"].get(99)
            self._row(
                "  gateway overhead per step p50/p99/p99.9 ms",
                _ms(lat["overhead_ms"]),
                "",
                f"p99 < {TARGET_OVERHEAD_P99:g} ms",
                _verdict(None if _nan(p99) else p99 < TARGET_OVERHEAD_P99),
            )
            self._row(
                "    dispatch p50/p99/p99.9 ms (includes waiting for a free worker slot)", _ms(lat["dispatch_ms"])
            )
            self._row("    settle p50/p99/p99.9 ms", _ms(lat["settle_ms"]))
            self._row("    bank_ms p50/p99/p99.9", _ms(lat["bank_ms"]))
            errors = {k: v for k, v in lat["statuses"].items() if k != 202}
            others = {k: v for k, v in lat["final_statuses"].items() if k != "authorized"}
            self._row(
                "  errors: API non-202 / non-authorized / retried ops",
                f"{errors or 0} / {others or 0} / {lat['attempts_over_1']}",
                "NOT ALL FINAL" if lat["timed_out"] else "",
            )
            timeouts = sum(v for k, v in lat["worker_log"].items() if "timeout" in k)
            self._row(
                "  worker log: bank timeouts / warnings+errors",
                f"{timeouts} / {sum(lat['worker_log'].values()) - timeouts}",
                ", ".join(f"{k}: {v}" for k, v in sorted(lat["worker_log"].items()))[:60],
            )
            cpu = self._cpu.get("latency (per payment, whole phase)", {})
            if "worker" in cpu and cpu["worker"][0] > 0:
                self._row(
                    "  worker one-core bound (1000 / worker CPU ms per payment)",
                    f"{1000 / cpu['worker'][0]:,.0f}/s",
                    f"worker CPU {cpu['worker'][0]:.2f} ms per auth",
                )
            rss = lat["worker_rss_kb"]
            if rss["before"] and rss["after"]:
                self._row(
                    "  worker RSS before -> after (growth)",
                    f"{rss['before'] / 1024:.0f} -> {rss['after'] / 1024:.0f} MB",
                    f"{(rss['after'] - rss['before']) / 1024:+.0f} MB",
                )

        self._issue9_rows()

        if self._mem:
            self.rows.append("PEAK RSS (VmHWM) per process")
            for name, (_rss, hwm) in self._mem.items():
                if hwm is None:
                    continue
                marks = " ".join(
                    f"{label} {m[name][1] / 1024:.0f}" for label, m in self._mem_marks if m.get(name, (None, None))[1]
                )
                self._row(
                    f"  {name}",
                    f"{hwm / 1024:.0f} MB",
                    f"peak after: {marks}" if marks else "",
                    f"< {TARGET_RSS_MB:g} MB" if name != "mockbank" else "(test double)",
                    _verdict(hwm / 1024 < TARGET_RSS_MB) if name != "mockbank" else "",
                )

        headline = [f"{title}\n{text}" for title, text in self.sections]
        return "\n\n".join(filter(None, [*headline, self._format(), self._format_cpu(), self._format_census()]))

    def _issue9_rows(self) -> None:
        """The cost headline and the overload scenario against their targets."""
        names = ("closed-64", "closed-256", "closed-1000", "flash-sale")
        checkouts = {s: self.data[s] for s in names if s in self.data}
        if checkouts:
            self.rows.append("CHECKOUTS (admission as shipped; bank at zero latency; submit, long-poll to final)")
        for scenario, run in checkouts.items():
            refused = run["refused"] if isinstance(run["refused"], int) else sum(run["refused"].values())
            self._row(f"  {scenario}: refused", str(refused), "", "0", _verdict(refused == 0))
            if "gateway_cpu_ms_per_payment" in run:
                ms = run["gateway_cpu_ms_per_payment"]
                headline = scenario == "closed-64"
                self._row(
                    f"  {scenario}: gateway CPU per completed authorization",
                    f"{ms:.2f} ms",
                    f"{_r(run['per_second'])}/s completed",
                    f"<= {TARGET_COST_MS:g} ms" if headline else "",
                    _verdict(ms <= TARGET_COST_MS) if headline else "",
                )
        refusal = self.data.get("refusal-cost")
        if refusal:
            self.rows.append("REFUSALS")
            self._row(
                "  API CPU per refused POST",
                f"{refusal['api_cpu_ms']:.3f} ms",
                f"{_r(refusal['per_second'])}/s refused",
                f"< {TARGET_REFUSAL_CPU_MS:g} ms",
                _verdict(refusal["api_cpu_ms"] < TARGET_REFUSAL_CPU_MS),
            )
        over = self.data.get("overload")
        if over:
            self.rows.append(f"OVERLOAD (open loop, {over['offered'] / over['capacity']:.1f}x capacity)")
            odd = {k: v for k, v in over["statuses"].items() if k not in (202, 429, 503)}
            self._row(
                "  answers other than 202/429/503, refusals without Retry-After",
                f"{sum(odd.values())}, {over['refusals_without_retry_after']}",
                str(odd) if odd else "",
                "0, 0",
                _verdict(not odd and over["refusals_without_retry_after"] == 0),
            )
            for label, key, target in (
                ("accepted", "accepted_ms", TARGET_OVERLOAD_ACCEPTED_P99),
                ("refused", "refused_ms", TARGET_OVERLOAD_REFUSED_P99),
            ):
                p99 = over[key].get(99, float("nan"))
                self._row(
                    f"  {label} p50/p99 ms",
                    f"{over[key].get(50, float('nan')):.1f} / {p99:.1f}",
                    "",
                    f"p99 < {target:g} ms",
                    _verdict(None if _nan(p99) else p99 < target),
                )
            goodput = over["goodput"] / over["capacity"]
            self._row(
                "  goodput (accepted / time until the last is final)",
                f"{goodput:.2f}x",
                f"{_r(over['goodput'])}/s",
                f">= {TARGET_OVERLOAD_GOODPUT:g}x",
                _verdict(None if _nan(goodput) else goodput >= TARGET_OVERLOAD_GOODPUT),
            )
            self._row(
                "  accepted, settled afterwards",
                f"{over['accepted']}, {over['settled']}",
                "",
                "all",
                _verdict(over["settled"] == over["accepted"]),
            )

    def _format_cpu(self) -> str:
        if not self._cpu:
            return ""
        roles = [r for r in ROLE_ORDER if any(r in per for per in self._cpu.values())]
        head = ["CPU ms per request / payment (kernel share)"] + roles + ["sum"]
        rows = []
        for label, per in self._cpu.items():
            cells = [label]
            for role in roles:
                ms, ks = per.get(role, (None, None))
                cells.append("-" if ms is None else f"{ms:.2f}" + (f" ({ks * 100:.0f}%)" if ks is not None else ""))
            cells.append(f"{sum(v[0] for v in per.values()):.2f}")
            rows.append(cells)
        note = (
            "(2 CPUs shared by every process above and the other users of this machine: "
            "a sum of S ms per payment caps the whole system at about 2000/S payments/s)"
        )
        return _table(head, rows) + "\n" + note

    def _format_census(self) -> str:
        if not self._census:
            return ""
        parts = []
        for label, per in self._census.items():
            roles = [r for r in ("api", "relay", "worker") if r in per]
            keys = sorted(
                {k for r in roles for k in per[r]},
                key=lambda k: (not k.startswith("pg t"), not k.startswith("pg r"), k),
            )
            rows = [[k] + [f"{per[r][k]:.2f}" if k in per[r] else "" for r in roles] for k in keys]
            parts.append(_table([f"round trips per payment: {label}"] + roles, rows))
        return "\n\n".join(parts)

    def _format(self) -> str:
        widths = [0, 0, 0, 0, 0]
        for row in self.rows:
            if isinstance(row, tuple):
                widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        widths = [min(w, cap) for w, cap in zip(widths, (66, 40, 40, 34, 7), strict=True)]
        header = ("metric", "figure", "ceiling / context", "target", "verdict")
        lines = []
        title = "FicMart gateway bench" + (" (quick)" if self.meta.get("quick") else "")
        if self.meta.get("profile"):
            title += f" -- PROFILED ({self.meta['profile']} under py-spy: its figures are distorted)"
        title += (
            f" -- {self.meta.get('cpus')} CPUs, load average {self.meta.get('load_avg_start', 0):.2f} at start"
            f" (figures on a shared machine are noisy)"
        )
        lines.append(title)
        sep = "-+-".join("-" * w for w in widths)
        lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.append(sep)
        for row in self.rows:
            if isinstance(row, str):
                lines.append(f"== {row}")
            else:
                lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        met = sum(1 for r in self.rows if isinstance(r, tuple) and r[4] == "MET")
        not_met = sum(1 for r in self.rows if isinstance(r, tuple) and r[4] == "NOT MET")
        lines.append(sep)
        lines.append(f"targets: {met} MET, {not_met} NOT MET")
        if self.meta.get("autovacuum"):
            lines.append(
                f"autovacuum/autoanalyze runs in the private database during the bench: {self.meta['autovacuum']}"
            )
        return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
