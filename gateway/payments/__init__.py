"""A payment's atomic phases, by capability. Each public phase is ONE transaction that reads
what it needs with the rows locked, asks the domain (gateway.domain) what may happen, and writes
every consequence (payment, history, operation, outbox message, stored idempotent response)
before it commits: no state in between that a crash could leave half-written.

    intake.py       the API's: authorize, and capture, void and refund requests
    settlement.py   the worker's: claim the lease, record what the bank answered, park
    lapses.py       the sweeper's: an expired hold released, an old card deleted
    operations.py   a new operation of a payment: its id, bank key and command

The phases that many concurrent requests make take and return batches (`*_many`, each list
in one statement); the batchers that gather them (gateway.batching) are built where a process
is composed, the API's in gateway/api/routes.py and the worker's in worker/consumer.py, and
each request goes through them. What one request then gets (a replay after a conflict, the
reason for a refusal) is read from its batch result by a thin function (intake.answer_*).
The decisions operators take are in gateway/ops/decisions.py.
"""
