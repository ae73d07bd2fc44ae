"""bench/table.py: the bench table's rows, read from a scenario's figures and judged against targets."""

from __future__ import annotations

import math

from bench import table


def by_label(lines: list[table.Line]) -> dict[str, tuple[str, str, str, str, str]]:
    return {line[0].strip(): line for line in lines if isinstance(line, tuple)}


def test_the_cost_target_judges_the_c64_checkouts_only():
    lines = table.rows(
        [
            (
                table.CHECKOUTS,
                [
                    {"scenario": "closed-64", "refused": 0, "gateway_cpu_ms_per_payment": 3.5, "per_second": 300.0},
                    {
                        "scenario": "closed-256",
                        "refused": {429: 2},
                        "gateway_cpu_ms_per_payment": 3.5,
                        "per_second": 1.0,
                    },
                    {"scenario": "flash-sale", "refused": {429: 1, 503: 2}},
                ],
            )
        ]
    )
    rows = by_label(lines)
    assert lines[0] == table.CHECKOUTS.title
    assert rows["closed-64: gateway CPU per completed authorization"][1:] == (
        "3.50 ms",
        "300/s completed",
        "<= 3 ms",
        "NOT MET",
    )
    assert rows["closed-256: gateway CPU per completed authorization"][3:] == ("", "")
    assert rows["closed-64: refused"][4] == "MET"
    assert rows["closed-256: refused"][1:] == ("2", "", "0", "NOT MET")
    assert rows["flash-sale: refused"][1] == "3"
    assert "flash-sale: gateway CPU per completed authorization" not in rows  # no figure, no row


def test_a_missing_figure_is_neither_met_nor_not_met():
    overload = {
        "offered": 900.0,
        "capacity": 300.0,
        "statuses": {202: 10, 429: 5, 500: 1},
        "refusals_without_retry_after": 0,
        "accepted_ms": {50: 10.0, 99: 300.0},
        "refused_ms": {50: 1.0},  # no p99: too few refusals
        "goodput": math.nan,
        "accepted": 10,
        "settled": 10,
    }
    lines = table.rows([(table.OVERLOAD, [overload])])
    rows = by_label(lines)
    assert lines[0] == "OVERLOAD (open loop, 3.0x capacity)"
    assert rows["answers other than 202/429/503, refusals without Retry-After"][1:] == (
        "1, 0",
        "{500: 1}",
        "0, 0",
        "NOT MET",
    )
    assert rows["accepted p50/p99 ms"][4] == "NOT MET"
    assert rows["refused p50/p99 ms"][4] == "-"
    assert rows["goodput (accepted / time until the last is final)"][4] == "-"
    assert rows["accepted, settled afterwards"][4] == "MET"


def test_a_section_without_subjects_prints_nothing_and_rows_follow_the_figures_there_are():
    accept_only = {
        "kind": "capture",
        "path": "POST /v1/payments/{id}/capture",
        "alone": "API alone, relay paused",
        "quick": True,
        "accept": {
            "closed_clients": 8,
            "closed_rate": 700.0,
            "closed_window_s": 1.0,
            "closed_latency_ms": {50: 1.0, 99: 2.0, 99.9: 3.0},
            "closed_statuses": {202: 5},
            "xacts_per_request": 2.0,
        },
        "e2e": None,
        "probe": None,
        "xacts": None,
        "cpu": {},
        "same": None,
        "naive": 600.0,
        "publish": None,
        "consume": None,
    }
    lines = table.rows([(table.MEMORY, []), (table.PIPELINE, [accept_only])])
    assert lines[0] == "CAPTURE  (POST /v1/payments/{id}/capture)"
    assert [line[0] for line in lines[1:]] == [
        "accepted/s, closed loop 8 clients (API alone, relay paused)",
        "  accept latency p50/p99/p99.9 ms, closed loop",
        "  PG commits per accepted request (pg_stat_database)",
    ]
    rows = by_label(lines)
    assert rows["accepted/s, closed loop 8 clients (API alone, relay paused)"][2:] == (
        "1.17 of naive-4RT",
        ">= naive 4RT (600/s)",
        "MET",
    )
    assert rows["PG commits per accepted request (pg_stat_database)"][1:3] == (
        "n/a",
        "window 1.0s; under 2 s pg_stat may not have flushed; approx.: earlier work may still flush "
        "(quick run has no quiet period)",
    )
