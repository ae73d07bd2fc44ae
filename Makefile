# Two commands for a newcomer: `make run` (whole system + demo) and `make test`.
# Both install what they need into .venv first (Python 3.11, PostgreSQL and
# RabbitMQ running locally; see README).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python

# The lock (see README, "Dependencies"): every package pinned with its hashes.
# dev.txt is compiled under runtime.txt as a constraint, so the versions they
# share are the same; build.txt is the build backend that installs the
# project itself (pyproject.toml's [build-system]).
LOCKS      := requirements/runtime.txt requirements/dev.txt requirements/build.txt
LOCK_FLAGS := --quiet --generate-hashes --universal --python-version 3.11 --custom-compile-command 'make lock'

.PHONY: install lint format lock run test test-long ha-up ha-down bench container-check clean

install: $(VENV)/.installed

# A fresh venv (--clear) on every change, so a package dropped from the lock
# does not linger. The project itself comes last, without dependencies and
# built by the locked backend.
$(VENV)/.installed: pyproject.toml $(LOCKS)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt -r requirements/build.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check || { echo 'pyproject.toml asks for what the lock lacks: run make lock' >&2; exit 1; }
	touch $@

# Runs every check even when an earlier one fails; fails if any did.
lint: install
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Re-resolves pyproject.toml, keeping every pin that still fits;
# `make lock UPGRADE=1` moves everything to the newest allowed versions.
lock: install
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) \
		pyproject.toml -o requirements/runtime.txt
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) \
		pyproject.toml --extra dev -c requirements/runtime.txt -o requirements/dev.txt
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) - -o requirements/build.txt

# scripts/services.sh starts PostgreSQL and RabbitMQ when they are installed but stopped,
# installs them (and, for the tests, Chromium) from Debian's packages when missing, or
# stops naming the command to run.
run: install
	bash scripts/services.sh
	$(PY) -m scripts.devstack

test: install
	bash scripts/services.sh --browser
	$(PY) -m pytest -q

# The long runs include the issue-22 drills (tests/ha): they bring up the RabbitMQ cluster and
# the PostgreSQL formation of scripts/ha/ha.sh themselves and take them down after.
test-long: install
	bash scripts/services.sh
	$(PY) -m pytest -q -m long

# A 3-node RabbitMQ cluster (5681-5683) and a pg_auto_failover formation (monitor 5440, nodes
# 5441-5442) as local processes, from Debian's packages (installed if missing); `make ha-up`
# prints the DATABASE_URL and AMQP_URL that reach them. The default services are not touched.
ha-up:
	bash scripts/ha/ha.sh up

ha-down:
	bash scripts/ha/ha.sh down

bench: install
	$(PY) -m bench.run

# Builds the image with podman, runs every process from it against the local
# PostgreSQL and RabbitMQ and walks the demo through it (README, "Containers").
container-check: install
	$(PY) -m scripts.container_check

clean:
	rm -rf $(VENV) .run .pytest_cache .hypothesis *.egg-info
