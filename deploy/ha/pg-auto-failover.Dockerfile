# PostgreSQL 15 with pg_auto_failover from the PostgreSQL project's Debian packages, for
# compose.yaml's `ha` profile (the same engines scripts/ha/ha.sh runs as local processes).
FROM postgres:15-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15-auto-failover pg-auto-failover-cli \
    && rm -rf /var/lib/apt/lists/*
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/node
