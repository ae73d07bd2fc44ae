"""Payments and parked operations as the API and the worker make them, with their dead letters,
for the tests of what ops do with them (gatewayctl, the ops console)."""

from __future__ import annotations

import uuid

import aio_pika
import orjson

from gateway import topology
from gateway.cards import CardVault
from gateway.domain import Action, BankOutcome, Verdict
from gateway.payments import settlement
from tests.support import factories, phases
from worker.handling import _dead_headers

QUORUM = {"x-queue-type": "quorum"}


class ParkedWork:
    """`error`: the last error every parked operation and dead letter carries."""

    def __init__(self, pool, broker, vault: CardVault, error: dict):
        self.pool, self.broker, self.vault, self.error = pool, broker, vault, error

    async def authorize(self, amount: int = 1500) -> tuple[str, str]:
        pid = await factories.authorize(self.pool, self.vault, amount)
        return pid, await self.pending_op(pid)

    async def pending_op(self, pid: str) -> str:
        return await self.pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)

    async def settle(self, op: str, body: dict) -> None:
        claim = await phases.claim(self.pool, op, "test", 30)
        assert isinstance(claim, settlement.Claim), claim
        await phases.record_outcome(self.pool, claim, Verdict.SUCCEEDED, BankOutcome("ok", 200, body=body), 1)

    async def parked(
        self, kind: str = "capture", *, first_attempt_hours_ago: float | None = None, dead_letters: int = 1
    ) -> tuple[str, str]:
        """A payment whose `kind` operation is parked, with its dead letter(s) in payments.dead."""
        pid, op = await self.authorize()
        if kind == "capture":
            await self.settle(op, {"authorization_id": f"auth_{uuid.uuid4()}", "expires_at": "2030-01-01T00:00:00Z"})
            req = factories.request(f"/v1/payments/{pid}/capture")
            await phases.request_action(self.pool, req, pid, Action.CAPTURE, None)
            op = await self.pending_op(pid)
        claim = await phases.claim(self.pool, op, "test-worker", 30)
        assert isinstance(claim, settlement.Claim)
        if first_attempt_hours_ago is not None:
            await self.pool.execute(
                "UPDATE operations SET first_attempt_at = now() - make_interval(secs => $2 * 3600) WHERE id = $1",
                op,
                first_attempt_hours_ago,
            )
        assert await settlement.park(self.pool, op, self.error) is not None
        for _ in range(dead_letters):
            await self.dead_letter(op, pid, kind, claim.attempts)
        return pid, op

    async def dead_letter(
        self, op: str, pid: str, kind: str, attempts: int = 1, headers: dict | None = None, body: bytes | None = None
    ) -> None:
        """A letter in payments.dead as the worker parks one (or with the headers and body given)."""
        channel = await self.broker.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body if body is not None else orjson.dumps({"operation_id": op}),
                headers=headers if headers is not None else _dead_headers(op, pid, kind, attempts, self.error),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.DEAD_QUEUE,
        )
        await channel.close()

    async def drain(self, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take (ack) every message of a queue, in order."""
        channel = await self.broker.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        out = []
        while (msg := await queue.get(no_ack=False, fail=False)) is not None:
            await msg.ack()
            out.append(msg)
        await channel.close()
        return out

    async def operation(self, op: str) -> dict:
        return dict(await self.pool.fetchrow("SELECT * FROM operations WHERE id = $1", op))
