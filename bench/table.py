"""What the bench's main table shows: one `Section` per scenario, one `Row` per figure.

A section's subjects are the figures of one run of it (a dict, as in the results JSON, with
the ceilings and CPU figures a row compares against); each row says when it applies, how to
read its label, figure and context from a subject, its target and how a figure is judged
against it. `rows` turns sections and their subjects into the table's lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

View = dict[str, Any]  # one subject's figures, JSON-like
Text = str | Callable[[View], str]
Line = tuple[str, str, str, str, str] | str  # (metric, figure, context, target, verdict), or a section title

TARGET_E2E = 500.0  # auths/s end to end at zero bank latency
TARGET_LATENCY = 400.0  # auths/s per worker at the default bank latency
TARGET_OPEN_P99 = 50.0  # ms, accept latency at half the closed-loop rate
PG_STAT_MIN_WINDOW = 2.0  # s: a window shorter than two pg_stat flushes gives no commit count
TARGET_OVERHEAD_P99 = 25.0  # ms, the gateway's own time per step
TARGET_RSS_MB = 150.0
TARGET_COST_MS = 3.0  # gateway CPU per completed authorization, at c=64
TARGET_OVERLOAD_ACCEPTED_P99 = 250.0  # ms, at 3x capacity
TARGET_OVERLOAD_REFUSED_P99 = 50.0  # ms, at 3x capacity
TARGET_OVERLOAD_GOODPUT = 0.8  # accepted / time until the last is final, in capacities
TARGET_REFUSAL_CPU_MS = 0.1  # the API's CPU per refused POST, HTTP included


@dataclass(frozen=True)
class Row:
    label: Text
    figure: Text
    context: Text = ""
    target: Text = ""
    judge: Callable[[View], bool | None] | None = None  # MET, NOT MET or, without a figure, "-"
    judged: Callable[[View], object] = lambda v: True  # whether this subject has a target at all
    when: Callable[[View], object] = lambda v: True  # whether the row applies to this subject


@dataclass(frozen=True)
class Section:
    title: Text  # read from the first subject
    rows: tuple[Row, ...]


def rows(sections: Iterable[tuple[Section, list[View]]]) -> list[Line]:
    """The table's lines: a title per section with subjects, then its rows that apply to each."""
    out: list[Line] = []
    for section, subjects in sections:
        if not subjects:
            continue
        out.append(_text(section.title, subjects[0]))
        for v in subjects:
            out.extend(_line(row, v) for row in section.rows if row.when(v))
    return out


def _line(row: Row, v: View) -> tuple[str, str, str, str, str]:
    verdict = "" if row.judge is None or not row.judged(v) else verdict_of(row.judge(v))
    return (_text(row.label, v), _text(row.figure, v), _text(row.context, v), _text(row.target, v), verdict)


def _text(t: Text, v: View) -> str:
    return t if isinstance(t, str) else t(v)


# ---- formatting and judging figures ---------------------------------------------------------


def nan(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def r(v: float | None) -> str:
    return "-" if v is None or nan(v) else f"{v:,.0f}"


def ms(d: dict[float, float] | None) -> str:
    """p50 / p99 / p99.9 of a percentile dict."""
    if not d:
        return "-"
    return " / ".join("-" if nan(d.get(q)) else f"{d[q]:,.1f}" for q in (50, 99, 99.9) if q in d)


def verdict_of(ok: bool | None) -> str:
    return "-" if ok is None else ("MET" if ok else "NOT MET")


def below(figure: float | None, target: float) -> bool | None:
    return None if figure is None or nan(figure) else figure < target


def at_least(figure: float | None, target: float) -> bool | None:
    return None if figure is None or nan(figure) else figure >= target


def p99(d: dict[float, float]) -> float | None:
    return d.get(99)


# ---- sections -------------------------------------------------------------------------------

CEILINGS = Section(
    "CEILINGS (this machine, this run)",
    (
        Row(
            lambda v: v["label"],
            lambda v: f"{r(v['rate'])}/s",
            lambda v: f"p50/p99/p99.9 {ms(v['latency_ms'])} ms" if v["latency_ms"] else "",
            lambda v: v["note"],
        ),
    ),
)


def _fractions(v: View) -> str:
    rate, same, naive = v["accept"]["closed_rate"], v["same"], v["naive"]
    return ", ".join(
        [
            *([f"{rate / same:.2f} of same-SQL"] if same else []),
            *([f"{rate / naive:.2f} of naive-4RT"] if naive else []),
        ]
    )


def _non_202(v: View) -> tuple[dict[object, int], dict[object, int]]:
    a = v["accept"]
    closed = {k: n for k, n in a["closed_statuses"].items() if k != 202}
    opened = {k: n for k, n in a.get("open_statuses", {}).items() if k != 202}
    return closed, opened


def _short_window(v: View) -> bool:
    # A backend sends its pg_stat counters at most once a second: a shorter
    # window (captures run out of authorized payments) may have seen none yet.
    return bool(v["accept"]["closed_window_s"] < PG_STAT_MIN_WINDOW)


def _commits_per_request_context(v: View) -> str:
    approx = v["kind"] == "capture" and v["quick"]
    return (
        f"window {v['accept']['closed_window_s']:.1f}s"
        + (f"; under {PG_STAT_MIN_WINDOW:g} s pg_stat may not have flushed" if _short_window(v) else "")
        + ("; approx.: earlier work may still flush (quick run has no quiet period)" if approx else "")
    )


def _e2e_target(v: View) -> float | None:
    return TARGET_E2E if v["kind"] == "authorize" else None


def _quiesced_commits(v: View) -> str:
    x = v["xacts"]
    fig = f"{x['total_per_payment']:.2f}"
    if "pipeline_per_payment" in x:
        fig += f" ({x['api_per_request']:.2f} API + {x['pipeline_per_payment']:.2f} relay/worker)"
    return fig


MESSAGES_PER_STEP = 2  # one command + one completion event published per step


def _one_core_bounds(v: View) -> str:
    cpu = v["cpu"]
    return ", ".join(
        f"{role} {1000 / cpu[role][0]:,.0f}/s"
        for role in ("api", "relay", "worker")
        if role in cpu and cpu[role][0] > 0
    )


def _other_outcomes(v: View) -> dict[str, int]:
    return {k: n for k, n in v["e2e"]["final_statuses"].items() if k not in ("authorized", "captured")}


def _has_accept(v: View) -> bool:
    return v["accept"] is not None


def _has_e2e(v: View) -> bool:
    return v["e2e"] is not None


def _has_probe(v: View) -> bool:
    return v["e2e"] is not None and v["probe"] is not None


def _e2e_rate(v: View) -> float:
    rate: float = v["e2e"]["rate_makespan"]
    return rate


# Authorize and capture: the API alone (closed and open loop), then the whole pipeline at zero
# bank latency (saturated, and a probe at half that rate). Subject: kind, accept, e2e, probe,
# xacts (the probe's quiesced commits), cpu (the e2e phase's per process), the ceilings' rates.
PIPELINE = Section(
    lambda v: f"{v['kind'].upper()}  ({v['path']})",
    (
        Row(
            lambda v: f"accepted/s, closed loop {v['accept']['closed_clients']} clients ({v['alone']})",
            lambda v: f"{r(v['accept']['closed_rate'])}/s",
            _fractions,
            lambda v: f">= naive 4RT ({r(v['naive'])}/s)" if v["naive"] else ">= naive 4RT (not run)",
            judge=lambda v: v["accept"]["closed_rate"] >= v["naive"] if v["naive"] else None,
            when=_has_accept,
        ),
        Row(
            "  accept latency p50/p99/p99.9 ms, closed loop",
            lambda v: ms(v["accept"]["closed_latency_ms"]),
            when=_has_accept,
        ),
        Row(
            lambda v: f"  accept latency p50/p99/p99.9 ms, open loop {r(v['accept']['open_rate'])}/s",
            lambda v: ms(v["accept"]["open_latency_ms"]),
            target=f"p99 < {TARGET_OPEN_P99:g} ms",
            judge=lambda v: below(p99(v["accept"]["open_latency_ms"]), TARGET_OPEN_P99),
            when=lambda v: _has_accept(v) and "open_latency_ms" in v["accept"],
        ),
        Row(
            "  non-202 answers / client errors",
            lambda v: "closed {} open {}".format(*_non_202(v)),
            when=lambda v: _has_accept(v) and any(_non_202(v)),
        ),
        Row(
            "  PG commits per accepted request (pg_stat_database)",
            lambda v: "n/a" if _short_window(v) else f"{v['accept']['xacts_per_request']:.2f}",
            _commits_per_request_context,
            when=lambda v: _has_accept(v) and v["accept"]["xacts_per_request"] is not None,
        ),
        Row(
            lambda v: (
                f"end-to-end {'auths' if v['kind'] == 'authorize' else 'captures'}/s, bank 0 ms "
                f"({v['e2e']['count']} at {r(v['e2e']['offered_rate'])}/s offered, saturated)"
            ),
            lambda v: f"{r(_e2e_rate(v))}/s",
            lambda v: f"steady {r(v['e2e']['steady_rate'])}/s",
            lambda v: f">= {TARGET_E2E:g}/s" if _e2e_target(v) else "",
            judge=lambda v: _e2e_rate(v) >= TARGET_E2E if _e2e_target(v) and _e2e_rate(v) else None,
            when=_has_e2e,
        ),
        Row(
            "  NOT ALL FINAL before the timeout",
            lambda v: str(v["e2e"]["final_statuses"]),
            when=lambda v: _has_e2e(v) and v["e2e"].get("timed_out"),
        ),
        Row(
            lambda v: f"  gateway overhead per step p50/p99/p99.9 ms, {r(v['probe']['offered_rate'])}/s offered",
            lambda v: ms(v["probe"]["overhead_ms"]),
            "half the e2e rate: not saturated",
            f"p99 < {TARGET_OVERHEAD_P99:g} ms",
            judge=lambda v: below(p99(v["probe"]["overhead_ms"]), TARGET_OVERHEAD_P99),
            when=_has_probe,
        ),
        Row(
            "    dispatch: API commit -> relay -> broker -> worker claim",
            lambda v: ms(v["probe"]["dispatch_ms"]),
            when=_has_probe,
        ),
        Row(
            "    settle: claim -> record_outcome commit, less bank_ms",
            lambda v: ms(v["probe"]["settle_ms"]),
            when=_has_probe,
        ),
        Row(
            "    bank_ms (mock bank at 0 ms chaos; includes the HTTP client)",
            lambda v: ms(v["probe"]["bank_ms"]),
            when=_has_probe,
        ),
        Row(
            lambda v: f"  overhead p50/p99/p99.9 ms at {r(v['e2e']['offered_rate'])}/s offered (saturated)",
            lambda v: ms(v["e2e"]["overhead_ms"]),
            lambda v: f"dispatch {ms(v['e2e']['dispatch_ms'])}",
            when=_has_e2e,
        ),
        Row(
            "  accept latency p50/p99/p99.9 ms, pipeline running (saturated)",
            lambda v: ms(v["e2e"]["accept_latency_ms"]),
            lambda v: f"client: {v['e2e']['client_peak_open']} open at most, {v['e2e']['client_waited']} waited",
            when=_has_e2e,
        ),
        Row(
            "  PG commits per payment, whole pipeline (quiesced pg_stat)",
            _quiesced_commits,
            "incl. LISTEN wake-up reads (see --census)",
            when=lambda v: _has_e2e(v) and v["xacts"],
        ),
        Row(
            "  PG commits per payment, whole pipeline",
            "(full run only: needs quiesced pg_stat)",
            when=lambda v: _has_e2e(v) and not v["xacts"] and v["kind"] == "authorize",
        ),
        Row(
            "  broker: publishes (command+event) per s / publish ceiling",
            lambda v: f"{r(_e2e_rate(v) * MESSAGES_PER_STEP)}/s",
            lambda v: f"{_e2e_rate(v) * MESSAGES_PER_STEP / v['publish']:.2f} of publish ceiling",
            when=lambda v: _has_e2e(v) and v["publish"] and _e2e_rate(v),
        ),
        Row(
            "  broker: consumes per s / consume ceiling",
            lambda v: f"{r(_e2e_rate(v))}/s",
            lambda v: f"{_e2e_rate(v) / v['consume']:.2f} of consume ceiling",
            when=lambda v: _has_e2e(v) and v["consume"] and _e2e_rate(v),
        ),
        Row(
            "  one-core bound per process (1000 / its CPU ms per payment)",
            _one_core_bounds,
            "where a process would saturate with a core to itself",
            when=lambda v: _has_e2e(v) and _one_core_bounds(v),
        ),
        Row(
            lambda v: f"  backlog drain after the relay resumed ({v['e2e']['drain']['count']} captures)",
            lambda v: f"{r(v['e2e']['drain']['rate'])}/s",
            lambda v: "timed out" if v["e2e"]["drain"]["timed_out"] else f"{v['e2e']['drain']['seconds']:.1f}s",
            when=lambda v: _has_e2e(v) and "drain" in v["e2e"],
        ),
        Row(
            "  other outcomes / operations retried",
            lambda v: f"{_other_outcomes(v)} / {v['e2e']['attempts_over_1']}",
            when=lambda v: _has_e2e(v) and (_other_outcomes(v) or v["e2e"]["attempts_over_1"]),
        ),
    ),
)


def _bank_timeouts(v: View) -> int:
    return sum(n for k, n in v["worker_log"].items() if "timeout" in k)


def _worker_cpu_ms(v: View) -> float:
    ms_per_payment: float = v["cpu"]["worker"][0]
    return ms_per_payment


# The default bank latency with one worker. Subject: the latency results and cpu (the phase's).
LATENCY = Section(
    "DEFAULT BANK LATENCY 100-2000 ms (one worker)",
    (
        Row(
            lambda v: f"completed auths/s ({v['count']} at {r(v['offered_rate'])}/s offered)",
            lambda v: f"{r(v['steady_rate'])}/s",
            lambda v: f"overall {r(v['rate_makespan'])}/s",
            f">= {TARGET_LATENCY:g}/s per worker",
            judge=lambda v: at_least(v["steady_rate"], TARGET_LATENCY),
        ),
        Row(
            "  accept latency p50/p99/p99.9 ms at this offered rate",
            lambda v: ms(v["accept_latency_ms"]),
            lambda v: f"client: {v['client_peak_open']} open at most, {v['client_waited']} waited",
        ),
        Row(
            "  bank calls in flight (max sampled leases / Little's law)",
            lambda v: f"{r(v['in_flight_max_sampled'])} / {r(v['in_flight_little'])}",
        ),
        Row(
            "  gateway overhead per step p50/p99/p99.9 ms",
            lambda v: ms(v["overhead_ms"]),
            "",
            f"p99 < {TARGET_OVERHEAD_P99:g} ms",
            judge=lambda v: below(p99(v["overhead_ms"]), TARGET_OVERHEAD_P99),
        ),
        Row(
            "    dispatch p50/p99/p99.9 ms (includes waiting for a free worker slot)",
            lambda v: ms(v["dispatch_ms"]),
        ),
        Row("    settle p50/p99/p99.9 ms", lambda v: ms(v["settle_ms"])),
        Row("    bank_ms p50/p99/p99.9", lambda v: ms(v["bank_ms"])),
        Row(
            "  errors: API non-202 / non-authorized / retried ops",
            lambda v: "{} / {} / {}".format(
                {k: n for k, n in v["statuses"].items() if k != 202} or 0,
                {k: n for k, n in v["final_statuses"].items() if k != "authorized"} or 0,
                v["attempts_over_1"],
            ),
            lambda v: "NOT ALL FINAL" if v["timed_out"] else "",
        ),
        Row(
            "  worker log: bank timeouts / warnings+errors",
            lambda v: f"{_bank_timeouts(v)} / {sum(v['worker_log'].values()) - _bank_timeouts(v)}",
            lambda v: ", ".join(f"{k}: {n}" for k, n in sorted(v["worker_log"].items()))[:60],
        ),
        Row(
            "  worker one-core bound (1000 / worker CPU ms per payment)",
            lambda v: f"{1000 / _worker_cpu_ms(v):,.0f}/s",
            lambda v: f"worker CPU {_worker_cpu_ms(v):.2f} ms per auth",
            when=lambda v: "worker" in v["cpu"] and _worker_cpu_ms(v) > 0,
        ),
        Row(
            "  worker RSS before -> after (growth)",
            lambda v: f"{v['worker_rss_kb']['before'] / 1024:.0f} -> {v['worker_rss_kb']['after'] / 1024:.0f} MB",
            lambda v: f"{(v['worker_rss_kb']['after'] - v['worker_rss_kb']['before']) / 1024:+.0f} MB",
            when=lambda v: v["worker_rss_kb"]["before"] and v["worker_rss_kb"]["after"],
        ),
    ),
)


def _refused(v: View) -> int:
    refused = v["refused"]
    return refused if isinstance(refused, int) else sum(refused.values())


def _headline(v: View) -> bool:
    """closed-64's CPU per completed authorization is the cost target; the others are context."""
    return bool(v["scenario"] == "closed-64")


# The checkouts (closed loops and the flash sale). Subject: one scenario's results and its name.
CHECKOUTS = Section(
    "CHECKOUTS (admission as shipped; bank at zero latency; submit, long-poll to final)",
    (
        Row(
            lambda v: f"  {v['scenario']}: refused",
            lambda v: str(_refused(v)),
            "",
            "0",
            judge=lambda v: _refused(v) == 0,
        ),
        Row(
            lambda v: f"  {v['scenario']}: gateway CPU per completed authorization",
            lambda v: f"{v['gateway_cpu_ms_per_payment']:.2f} ms",
            lambda v: f"{r(v['per_second'])}/s completed",
            lambda v: f"<= {TARGET_COST_MS:g} ms" if _headline(v) else "",
            judge=lambda v: v["gateway_cpu_ms_per_payment"] <= TARGET_COST_MS,
            judged=_headline,
            when=lambda v: "gateway_cpu_ms_per_payment" in v,
        ),
    ),
)

REFUSALS = Section(
    "REFUSALS",
    (
        Row(
            "  API CPU per refused POST",
            lambda v: f"{v['api_cpu_ms']:.3f} ms",
            lambda v: f"{r(v['per_second'])}/s refused",
            f"< {TARGET_REFUSAL_CPU_MS:g} ms",
            judge=lambda v: v["api_cpu_ms"] < TARGET_REFUSAL_CPU_MS,
        ),
    ),
)


def _odd_answers(v: View) -> dict[object, int]:
    return {k: n for k, n in v["statuses"].items() if k not in (202, 429, 503)}


def _p50_p99(key: str) -> Callable[[View], str]:
    return lambda v: f"{v[key].get(50, float('nan')):.1f} / {v[key].get(99, float('nan')):.1f}"


def _goodput(v: View) -> float:
    return float(v["goodput"] / v["capacity"])


# Open loop at a multiple of the measured capacity. Subject: the overload results.
OVERLOAD = Section(
    lambda v: f"OVERLOAD (open loop, {v['offered'] / v['capacity']:.1f}x capacity)",
    (
        Row(
            "  answers other than 202/429/503, refusals without Retry-After",
            lambda v: f"{sum(_odd_answers(v).values())}, {v['refusals_without_retry_after']}",
            lambda v: str(_odd_answers(v)) if _odd_answers(v) else "",
            "0, 0",
            judge=lambda v: not _odd_answers(v) and v["refusals_without_retry_after"] == 0,
        ),
        Row(
            "  accepted p50/p99 ms",
            _p50_p99("accepted_ms"),
            "",
            f"p99 < {TARGET_OVERLOAD_ACCEPTED_P99:g} ms",
            judge=lambda v: below(v["accepted_ms"].get(99, float("nan")), TARGET_OVERLOAD_ACCEPTED_P99),
        ),
        Row(
            "  refused p50/p99 ms",
            _p50_p99("refused_ms"),
            "",
            f"p99 < {TARGET_OVERLOAD_REFUSED_P99:g} ms",
            judge=lambda v: below(v["refused_ms"].get(99, float("nan")), TARGET_OVERLOAD_REFUSED_P99),
        ),
        Row(
            "  goodput (accepted / time until the last is final)",
            lambda v: f"{_goodput(v):.2f}x",
            lambda v: f"{r(v['goodput'])}/s",
            f">= {TARGET_OVERLOAD_GOODPUT:g}x",
            judge=lambda v: at_least(_goodput(v), TARGET_OVERLOAD_GOODPUT),
        ),
        Row(
            "  accepted, settled afterwards",
            lambda v: f"{v['accepted']}, {v['settled']}",
            "",
            "all",
            judge=lambda v: v["settled"] == v["accepted"],
        ),
    ),
)


def _judged_for_rss(v: View) -> bool:
    return bool(v["name"] != "mockbank")  # the mock bank is a test double: no target


# Peak RSS. Subject: one process's name, VmHWM (kB) and its peak after each marked phase.
MEMORY = Section(
    "PEAK RSS (VmHWM) per process",
    (
        Row(
            lambda v: f"  {v['name']}",
            lambda v: f"{v['hwm'] / 1024:.0f} MB",
            lambda v: f"peak after: {v['marks']}" if v["marks"] else "",
            lambda v: f"< {TARGET_RSS_MB:g} MB" if _judged_for_rss(v) else "(test double)",
            judge=lambda v: v["hwm"] / 1024 < TARGET_RSS_MB,
            judged=_judged_for_rss,
        ),
    ),
)
