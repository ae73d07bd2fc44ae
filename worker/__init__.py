"""The asynchronous side of the gateway.

relay.py     outbox -> RabbitMQ (gateway-relay)
topology.py  exchanges, the quorum work queue, the retry ladder, the dead-letter queue
bank.py      the bank's HTTP contract -> domain.BankOutcome
consumer.py  command -> bank -> gateway.payments.settlement (gateway-worker)
sweeper.py   stuck operations and lapsed holds, run inside the worker
settings.py  the worker's and relay's own environment variables
"""
