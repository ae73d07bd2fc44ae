"""What the running mock bank holds beside its books: the chaos switches in force, the
faults armed through /_mock/faults, the random rolls, the database queueing and the counters
of what chaos did (the "stats" of GET /_mock/ledger). One State per app, under STATE."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mockbank.config import Chaos, Config
from mockbank.contention import Database
from mockbank.ledger import Bank

# Fault actions by the step that takes them (see mockbank.bank_api's docstring).
LOOKUP_FAULTS = frozenset({"lookup_fails"})
REQUEST_FAULTS = frozenset({"error", "drop", "lose_response", "forget_key", "delay"})
POST_ONLY_FAULTS = frozenset({"lookup_fails", "forget_key"})
# Faults that promise the work is done, so the FAILURE_RATE roll is skipped.
WORK_FAULTS = frozenset({"lose_response", "forget_key"})


@dataclass
class Fault:
    fault_id: str
    action: str
    path: str
    method: str | None
    remaining: int
    delay_ms: float = 0.0
    status: int = 500
    body: Any = None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path

    def public(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id,
            "action": self.action,
            "path": self.path,
            "method": self.method,
            "remaining": self.remaining,
            "delay_ms": self.delay_ms,
            "status": self.status,
            "body": self.body,
        }


def new_stats() -> dict[str, int]:
    return dict.fromkeys(
        (
            "api_requests",
            "replays",
            "injected_failures",
            "lost_responses",
            "dropped_down",
            "faults_applied",
            "bad_requests",
            "clients_gone",
            "keys_forgotten",
            "lookup_failures",
            "responses_cut_off",
        ),
        0,
    )


@dataclass
class State:
    config: Config
    bank: Bank
    chaos: Chaos
    database: Database
    rng: random.Random = field(default_factory=random.Random)
    faults: list[Fault] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=new_stats)
    fault_ids: Any = field(default_factory=lambda: itertools.count(1))

    def take_fault(self, method: str, path: str, actions: frozenset[str]) -> Fault | None:
        for fault in self.faults:
            if fault.action in actions and fault.matches(method, path):
                fault.remaining -= 1
                self.stats["faults_applied"] += 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None


STATE = web.AppKey("state", State)
