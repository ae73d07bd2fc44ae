# One image for every process of the gateway: mockbank, gateway-api,
# gateway-relay, gateway-worker and gatewayctl. compose.yaml picks the
# process per service with `command:`; the default is the API.
#
#   docker build -t ficmart-gateway:dev .
#   docker run --rm -p 8080:8080 -e CARD_ENCRYPTION_KEY=... ficmart-gateway:dev

# Bookworm named, not implied: `make container-check` builds a stand-in for
# this image from Debian bookworm where no registry is reachable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder ----
# Builds /opt/venv: the locked runtime dependencies (requirements/runtime.txt,
# no dev tools) plus the project itself, installed in editable mode from /app.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first, from the lock alone, so that a change to the sources
# does not reinstall them. Every file is checked against its hash in the
# lock; every dependency ships wheels for CPython 3.11 (amd64 and arm64), so
# no compiler is needed. build.txt is the build backend for the next step.
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN pip install --require-hashes -r requirements/runtime.txt -r requirements/build.txt

# The project. gateway/store/database.py reads the schema as
# Path(__file__).resolve().parent.parent.parent / "schema.sql", i.e. next to the
# package directory, so the packages must be imported from the source tree
# in /app, not from a copy in site-packages (where `pip install .` would put
# them, without schema.sql). An editable install does exactly that: it puts
# only metadata, the console scripts and a path hook into the venv, and the
# hook maps gateway, gatewayctl, worker and mockbank to /app/<package>. The final stage
# therefore keeps the source tree at the same path, /app, and the venv at
# the same path, /opt/venv.
COPY . .
RUN pip install --no-deps --no-build-isolation -e .

# ------------------------------------------------------------------ final ----
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="ficmart-gateway" \
      org.opencontainers.image.description="FicMart payment gateway: API, relay, worker, mock bank"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# An unprivileged user with a fixed uid; the code and the venv stay owned by
# root, so the processes cannot modify them.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Only what .dockerignore lets through: pyproject.toml, schema.sql, the
# runtime lock and the gateway, gatewayctl, worker and mockbank packages (the same files
# the builder installed from). Compiled once here, since the processes
# cannot write bytecode next to the sources.
COPY . .
RUN python -m compileall -q gateway gatewayctl worker mockbank \
    && python -c "from gateway import store; assert store.SCHEMA_PATH.is_file(), store.SCHEMA_PATH"

USER 10001:10001

# 8080: gateway-api, 8787: mockbank. Both listen on 127.0.0.1 unless told
# --host 0.0.0.0, as below and in compose.yaml. The API's admin listener
# (/metrics, /healthz, /readyz, /ops; API_ADMIN_PORT 9100) stays on 127.0.0.1
# unless told --admin-host: compose.yaml opens it to the project's network only.
EXPOSE 8080 8787

# No HEALTHCHECK here: the relay and the worker serve no HTTP, so each
# service declares its own check in compose.yaml.
CMD ["gateway-api", "--host", "0.0.0.0", "--port", "8080"]
