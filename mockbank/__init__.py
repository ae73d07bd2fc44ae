"""Mock card bank for the payment gateway's tests (see docs/bank.md).

* ``mockbank.server`` - the aiohttp app and the ``mockbank`` console script
  (also ``python -m mockbank``).
* ``mockbank.bank_api`` - the contract's endpoints and the chaos on their way
  (the processing order of a request, in its module docstring).
* ``mockbank.mock_api`` - the /_mock/* test endpoints (documented in its module
  docstring).
* ``mockbank.state`` - what the server holds beside the books: chaos switches,
  armed faults, counters.
* ``mockbank.ledger`` - the in-memory accounts and books.
* ``mockbank.idempotency`` - the remembered responses replayed for a repeated key.
* ``mockbank.cards`` - the test cards and Luhn; ``extra_card(i)`` gives the card
  data of generated load-test account ``i``.
* ``mockbank.contention`` - the upstream bank's database queueing (connection
  pool, account row locks), off unless DB_TRANSACTION_MS > 0.
* ``mockbank.config`` - environment variables and their validation.
"""

from mockbank.cards import TEST_ACCOUNTS, extra_card, luhn_valid

__all__ = ["TEST_ACCOUNTS", "extra_card", "luhn_valid"]
