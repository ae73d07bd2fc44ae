"""What operators do, in one place: the dead-letter queue (deadletters.py), what a replay of a
parked operation decides (replay.py), reconciliation of receipts against the bank's books
(reconcile.py), moving vaulted cards to the newest card key (cardkeys.py) and the human
decisions on a payment: settle, resolve, set-reference, abandon (decisions.py). gatewayctl and
the /ops console are thin front-ends over these."""
