"""The system harness: starts the real processes (mock bank, API, relay, worker) and the
private databases and vhosts they use. Tests, bench and `make run` import it; the product
never does."""
