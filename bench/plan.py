"""What a bench run does: its scenarios, how long each measures (full or --quick) and the
command line that chooses them (see bench/run.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.system import ROLES

CLOSED = {"closed-64": 64, "closed-256": 256, "closed-1000": 1000}  # scenario -> clients
SCENARIOS = (
    "ceilings",
    "authorize",
    "e2e",
    "capture",
    "latency",
    *CLOSED,
    "flash-sale",
    "overload",
    "refusal-cost",
)
# Those that need the pipeline (relay and worker) running.
PIPELINE = ("e2e", "capture", "latency", *CLOSED, "flash-sale", "overload", "refusal-cost")
PROFILE_PHASE = {"api": "authorize", "worker": "e2e", "relay": "e2e", "mockbank": "e2e"}
# --profile during a checkout scenario instead: --profile worker --scenario closed-64 (or the
# refusals: --profile api --scenario refusal-cost)


@dataclass
class Plan:
    ceiling_warmup: float
    ceiling_seconds: float
    warmup: float
    seconds: float
    open_seconds: float
    e2e_count: int
    capture_rate_count: int
    probe_seconds: float
    latency_seconds: float
    final_timeout: float
    closed_counts: tuple[int, int, int]  # payments measured at c=64, 256, 1000
    overload_seconds: float


FULL = Plan(
    ceiling_warmup=1,
    ceiling_seconds=8,
    warmup=2,
    seconds=10,
    open_seconds=8,
    e2e_count=5000,
    capture_rate_count=1000,
    probe_seconds=5,
    latency_seconds=12,
    final_timeout=45,
    closed_counts=(3000, 3000, 4000),
    overload_seconds=20,
)
QUICK = Plan(
    ceiling_warmup=0.5,
    ceiling_seconds=2,
    warmup=1,
    seconds=4,
    open_seconds=4,
    e2e_count=2500,
    capture_rate_count=500,
    probe_seconds=3,
    latency_seconds=5,
    final_timeout=30,
    closed_counts=(1000, 1000, 2000),
    overload_seconds=8,
)


def parse(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """The command line, its chosen scenarios in `chosen` (in the order they run); `doc` is the
    command's docstring: its first paragraph describes it, the third on its epilog."""
    p = argparse.ArgumentParser(
        prog="bench.run",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc.split("\n\n")[2:]),
    )
    p.add_argument("--quick", action="store_true", help="shorter runs (~1 minute)")
    p.add_argument(
        "--scale",
        type=int,
        default=1,
        help="processes of each of gateway-api, gateway-relay and gateway-worker (default 1)",
    )
    p.add_argument(
        "--pin-api",
        action="store_true",
        help="overload: the API and the load generator on one CPU, every other process (PostgreSQL and "
        "RabbitMQ included) on the others, as if the API had a host of its own (bench/pinning.py)",
    )
    p.add_argument(
        "--scenarios",
        "--scenario",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all; capture implies e2e)",
    )
    p.add_argument(
        "--profile",
        choices=ROLES,
        help="run py-spy on this process during its zero-latency load "
        "(api: the authorize runs; worker/relay/mockbank: e2e) and print the top functions; "
        "without --scenarios only that scenario runs",
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames of asyncpg, uvloop...)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop concurrency (default 64)")
    p.add_argument(
        "--e2e-rate",
        type=float,
        default=600.0,
        help="offered authorizations/s in the e2e scenario (default 600; target 500)",
    )
    p.add_argument("--capture-rate", type=float, default=500.0, help="offered captures/s, pipeline running")
    p.add_argument(
        "--latency-rate",
        type=float,
        default=500.0,
        help="offered authorizations/s at the default bank latency (default 500; target 400)",
    )
    p.add_argument(
        "--overload-capacity",
        type=float,
        help="overload: take this as the capacity (authorizations/s) instead of measuring it, so "
        "that runs compared A/B are offered the same rate (3x this)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=load.MAX_IN_FLIGHT,
        help=f"open loop: most requests open at once, like a client's connection pool "
        f"(default {load.MAX_IN_FLIGHT}); later ones wait, their latency counted from when due",
    )
    p.add_argument("--cards", type=int, default=10_000, help="generated bank accounts to spread load over")
    p.add_argument(
        "--db-pool-size",
        type=int,
        default=None,
        help="gateway-api --db-pool-size, also used by the PostgreSQL ceilings (default: the API's 20)",
    )
    p.add_argument("--worker-concurrency", type=int, help="WORKER_CONCURRENCY for the worker (default: its own)")
    p.add_argument("--worker-prefetch", type=int, help="WORKER_PREFETCH for the worker (default: its own)")
    p.add_argument("--log-level", default="info", help="LOG_LEVEL of the gateway processes (default info, as shipped)")
    p.add_argument(
        "--without-outbox-notify",
        action="store_true",
        help="diagnostic: drop the outbox NOTIFY trigger in the private database (the relay then "
        "polls every 20 ms); shows the API without the commit serialisation NOTIFY causes",
    )
    p.add_argument(
        "--census",
        action="store_true",
        help="run api/relay/worker under bench.census and print PostgreSQL round trips, transactions "
        "and AMQP publishes/acks per payment by process and statement",
    )
    p.add_argument("--json", type=Path, help="also write the results here (default bench/out/results-<time>.json)")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s.strip()]
    if args.profile and args.scenarios is None:
        chosen = [PROFILE_PHASE[args.profile]]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if "capture" in chosen and "e2e" not in chosen:
        chosen.append("e2e")
    args.chosen = [s for s in SCENARIOS if s in chosen]
    return args
