"""Mock card bank for the payment gateway's tests (see docs/bank.md).

* ``mockbank.server`` - the aiohttp app, the ``mockbank`` console script and the
  /_mock/* test endpoints (documented in its module docstring).
* ``mockbank.ledger`` - the in-memory books; ``extra_card(i)`` gives the card
  data of generated load-test account ``i``.
* ``mockbank.contention`` - the upstream bank's database queueing (connection
  pool, account row locks), off unless DB_TRANSACTION_MS > 0.
* ``mockbank.config`` - environment variables and their validation.
"""

from mockbank.cards import TEST_ACCOUNTS, extra_card, luhn_valid

__all__ = ["TEST_ACCOUNTS", "extra_card", "luhn_valid"]
