# Two commands for a newcomer: `make run` (whole system + demo) and `make test`.
# Both install what they need into .venv first (Python 3.11, PostgreSQL and
# RabbitMQ running locally; see README).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install run demo test test-long bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(PY) -m scripts.devstack

test: install
	$(PY) -m pytest -q

test-long: install
	$(PY) -m pytest -q -m long

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .run .pytest_cache .hypothesis *.egg-info
