"""The one table `make bench` prints: figures, their ceilings, targets, MET / NOT MET.

Report collects each scenario's figures (into `data`, written as the results JSON);
render() hands them, as the subjects of bench/table.py's sections, to its one renderer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench import measure, table
from bench.ceilings import Ceiling
from bench.load import LoadResult
from bench.system import Snapshot
from bench.table import View

ROLE_ORDER = ("api", "relay", "worker", "mockbank", "postgres", "rabbitmq", "loadgen")
CHECKOUTS = ("closed-64", "closed-256", "closed-1000", "flash-sale")
CEILING_LABELS = {
    "pg_same_sql": "PG submit, SAME SQL as authorize() (one statement)",
    "pg_naive_4rt": "PG submit txn, naive 4 INSERTs (reference)",
    "pg_same_sql_no_notify": "PG same SQL, outbox NOTIFY trigger dropped (diag.)",
    "rabbit_publish_confirm": "RabbitMQ publish + confirm, persistent, quorum queue",
    "rabbit_consume_ack": "RabbitMQ consume + ack",
}
PATHS = {"authorize": "POST /v1/payments", "capture": "POST /v1/payments/{id}/capture"}
CpuPerItem = dict[str, tuple[float, float | None]]  # role -> (CPU ms per item, kernel share)
Memory = dict[str, tuple[int | None, int | None]]  # process -> (VmRSS kB, VmHWM kB)
Census = dict[str, dict[str, int]]  # role -> counter -> count (bench.census)


class Report:
    def __init__(self, *, quick: bool, profile: str | None):
        self.meta: dict[str, Any] = {"quick": quick, "profile": profile}
        self.ceilings: dict[str, Ceiling] = {}
        self.rows: list[table.Line] = []
        self.data: dict[str, Any] = {"meta": self.meta, "ceilings": {}, "results": {}}  # the results JSON
        self._accept: dict[str, View] = {}
        self._sections: dict[str, View] = {}
        self._mem: Memory = {}
        self._mem_marks: list[tuple[str, Memory]] = []
        self._cpu: dict[str, CpuPerItem] = {}
        self._census: dict[str, dict[str, dict[str, float]]] = {}
        self._probes: dict[str, View] = {}
        self.sections: list[tuple[str, str]] = []  # (title, text): printed before the table

    # ---- collecting ---------------------------------------------------------------------------

    def accept(self, kind: str, closed: LoadResult, opened: LoadResult | None) -> float | None:
        """Accept figures of one action; returns PostgreSQL commits per accepted request."""
        accepted = len(closed.accepted())
        xacts = None
        if accepted and closed.before is not None and closed.after is not None:
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
        drain: tuple[int, float, bool] | None = None,  # captures drained, seconds, timed out
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
        mem0: Memory,
        mem1: Memory,
        events: Counter[str],
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

    def census(self, label: str, before: Census, after: Census, items: int) -> None:
        """Round trips and messages per payment by process (bench --census)."""
        if not items or not after:
            return
        per = {}
        for role, counts in after.items():
            old = before.get(role, {})
            per[role] = {k: (v - old.get(k, 0)) / items for k, v in counts.items() if v - old.get(k, 0)}
        self._census[label] = per
        self.data["results"].setdefault("census", {})[label] = per

    def memory_mark(self, after: str, mem: Memory) -> None:
        self._mem_marks.append((after, mem))
        self.data["results"].setdefault("memory_marks_kb", {})[after] = {
            k: {"rss": v[0], "peak": v[1]} for k, v in mem.items()
        }

    def tables(self, rows: list[dict[str, Any]]) -> None:
        self.data["results"]["tables"] = rows
        vac = [
            f"{r['relname']} {r['autovacuum_count']}/{r['autoanalyze_count']}"
            for r in rows
            if r["autovacuum_count"] or r["autoanalyze_count"]
        ]
        self.meta["autovacuum"] = ", ".join(vac) if vac else "none"

    def memory(self, mem: Memory) -> None:
        self._mem = mem
        self.data["results"]["memory_kb"] = {k: {"rss": v[0], "peak": v[1]} for k, v in mem.items()}

    # ---- rendering ----------------------------------------------------------------------------

    def _ceil(self, name: str) -> float | None:
        c = self.ceilings.get(name)
        return c.rate if c is not None else None

    def _pipeline(self, kind: str) -> list[View]:
        a, e = self._accept.get(kind), self._sections.get(kind)
        if not a and not e:
            return []
        probe = self._probes.get(kind)
        return [
            {
                "kind": kind,
                "path": PATHS[kind],
                "alone": "API alone" if kind == "authorize" else "API alone, relay paused",
                "quick": self.meta.get("quick"),
                "accept": a or None,
                "e2e": e or None,
                "probe": probe or None,
                "xacts": (probe or {}).get("xacts"),
                "cpu": self._cpu.get(f"{kind} e2e (per payment, whole phase)", {}),
                "same": self._ceil("pg_same_sql"),
                "naive": self._ceil("pg_naive_4rt"),
                "publish": self._ceil("rabbit_publish_confirm"),
                "consume": self._ceil("rabbit_consume_ack"),
            }
        ]

    def _memory(self) -> list[View]:
        return [
            {
                "name": name,
                "hwm": hwm,
                "marks": " ".join(
                    f"{label} {peak / 1024:.0f}"
                    for label, m in self._mem_marks
                    if (peak := m.get(name, (None, None))[1])
                ),
            }
            for name, (_rss, hwm) in self._mem.items()
            if hwm is not None
        ]

    def _subjects(self) -> list[tuple[table.Section, list[View]]]:
        lat = self._sections.get("latency")
        cpu = self._cpu.get("latency (per payment, whole phase)", {})
        return [
            (
                table.CEILINGS,
                [
                    {
                        "label": CEILING_LABELS.get(name, name),
                        "rate": c.rate,
                        "latency_ms": c.latency_ms,
                        "note": c.note,
                    }
                    for name, c in self.ceilings.items()
                ],
            ),
            (table.PIPELINE, self._pipeline("authorize")),
            (table.PIPELINE, self._pipeline("capture")),
            (table.LATENCY, [lat | {"cpu": cpu}] if lat else []),
            (table.CHECKOUTS, [self.data[s] | {"scenario": s} for s in CHECKOUTS if s in self.data]),
            (table.REFUSALS, [self.data["refusal-cost"]] if self.data.get("refusal-cost") else []),
            (table.OVERLOAD, [self.data["overload"]] if self.data.get("overload") else []),
            (table.MEMORY, self._memory()),
        ]

    def render(self) -> str:
        self.data["ceilings"] = {
            k: {"rate": c.rate, "ops": c.ops, "seconds": c.seconds, "latency_ms": c.latency_ms, "note": c.note}
            for k, c in self.ceilings.items()
        }
        self.rows = table.rows(self._subjects())
        headline = [f"{title}\n{text}" for title, text in self.sections]
        return "\n\n".join(filter(None, [*headline, self._format(), self._format_cpu(), self._format_census()]))

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
            roles: list[str] = [r for r in ("api", "relay", "worker") if r in per]
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
