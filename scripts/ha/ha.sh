#!/usr/bin/env bash
# A RabbitMQ cluster and a PostgreSQL failover formation as local processes (no Docker),
# for the issue-22 drills (tests/ha) and for trying the gateway against several nodes.
#
#   scripts/ha/ha.sh up      install what is missing (Debian packages), start, wait, print the env
#   scripts/ha/ha.sh down    stop everything it started and remove its data
#   scripts/ha/ha.sh env     the client settings (DATABASE_URL, AMQP_URL, ...) as shell exports
#   scripts/ha/ha.sh start-rabbit N / start-pg nodeN   one node again, after a drill killed it
#
# RabbitMQ: three rabbitmq-server nodes gwha1..3@localhost on 127.0.0.1:5681-5683 (Erlang
# distribution on 25681-25683), each with its own data and log directory, joined with
# rabbitmqctl join_cluster. The node on 5672 (rabbit@localhost) is not touched.
# PostgreSQL: pg_auto_failover (postgresql-15-auto-failover, pg-auto-failover-cli): a monitor
# on 5440 and two data nodes on 5441 and 5442, synchronous replication while the standby is
# healthy; shared_buffers lowered to 64MB each (pg_autoctl sizes it to 25% of RAM per instance);
# the monitor's failover timeouts shortened (pg_fast_failover).
# Everything lives under HA_DIR (default /tmp/gateway-ha), owned by the services' users.
set -euo pipefail

HA_DIR=${HA_DIR:-/tmp/gateway-ha}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
RABBIT_BIN=/usr/lib/rabbitmq/bin
MONITOR_PORT=5440
PG_PORTS=(5441 5442)
AMQP_PORTS=(5681 5682 5683)
MONITOR_URI="postgres://autoctl_node@127.0.0.1:${MONITOR_PORT}/pg_auto_failover?sslmode=disable"

as_postgres() { runuser -u postgres -- env PATH="$PG_BIN:$PATH" "$@"; }
# The services are started with runuser in a session of its own (setsid): runuser kills what it
# runs when a signal reaches it, and a caller's process group (a test run, a shell job) ending
# would take a node it restarted down with it.
rabbitmqctl_on() { runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq "$RABBIT_BIN/rabbitmqctl" -n "$1" "${@:2}"; }
node_name() { echo "gwha$1@localhost"; }

install_missing() {
    local missing=()
    command -v pg_autoctl >/dev/null || missing+=(postgresql-15-auto-failover pg-auto-failover-cli)
    [ -x "$RABBIT_BIN/rabbitmq-server" ] || missing+=(rabbitmq-server)
    [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "ha: missing ${missing[*]}: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# ---- RabbitMQ ---------------------------------------------------------------------------

rabbit_start_node() {
    local i=$1 dir="$HA_DIR/rabbit/n$1" port=${AMQP_PORTS[$(($1 - 1))]}
    mkdir -p "$dir/mnesia" "$dir/log"
    printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$port" >"$dir/rabbitmq.conf"
    echo '[].' >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
    setsid runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq RABBITMQ_NODENAME="$(node_name "$i")" \
        RABBITMQ_DIST_PORT=$((20000 + port)) RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
        setsid "$RABBIT_BIN/rabbitmq-server" >"$dir/server.log" 2>&1 </dev/null &
}

rabbit_wait_node() {
    local i=$1
    for _ in $(seq 120); do
        [ -s "$HA_DIR/rabbit/n$i/pid" ] && break
        sleep 0.5
    done
    rabbitmqctl_on "$(node_name "$i")" wait -q --timeout 90 "$HA_DIR/rabbit/n$i/pid"
}

rabbit_up() {
    for i in 1 2 3; do rabbit_start_node "$i"; done
    for i in 1 2 3; do rabbit_wait_node "$i"; done
    for i in 2 3; do
        local node
        node=$(node_name "$i")
        if ! rabbitmqctl_on "$node" cluster_status -q 2>/dev/null | grep -q "$(node_name 1)"; then
            rabbitmqctl_on "$node" stop_app -q
            rabbitmqctl_on "$node" reset -q
            rabbitmqctl_on "$node" join_cluster -q "$(node_name 1)"
            rabbitmqctl_on "$node" start_app -q
        fi
    done
}

# `start N`: one node again (after a drill killed it), rejoining the cluster it was in.
rabbit_start_one() {
    rm -f "$HA_DIR/rabbit/n$1/pid"
    rabbit_start_node "$1"
    rabbit_wait_node "$1"
}

rabbit_down() {
    for i in 1 2 3; do
        local pidfile="$HA_DIR/rabbit/n$i/pid"
        if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            rabbitmqctl_on "$(node_name "$i")" stop -q "$pidfile" 2>/dev/null || kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
    rm -rf "$HA_DIR/rabbit"
}

# ---- PostgreSQL -------------------------------------------------------------------------

pg_run() {
    local name=$1
    setsid runuser -u postgres -- env PATH="$PG_BIN:$PATH" setsid pg_autoctl run --pgdata "$HA_DIR/pg/$name" >>"$HA_DIR/pg/$name.log" 2>&1 </dev/null &
}

pg_low_memory() { echo "shared_buffers = '64MB'" >>"$HA_DIR/pg/$1/postgresql.auto.conf"; }

# The monitor's defaults take ~50 s to fail over from a lost primary (20 s before a silent node
# is unhealthy, then 30 s for it to demote itself). A test bed whose lost host is really dead
# can use shorter ones (~10 s). In production keep primary_demote_timeout above the keepers'
# network_partition_timeout (20 s): a primary cut off from the monitor demotes itself in that
# time, and promoting the standby before then risks two primaries.
pg_fast_failover() {
    local setting
    for setting in "health_check_period = 1000" "health_check_timeout = 2000" "health_check_max_retries = 1" \
        "health_check_retry_delay = 1000" "node_considered_unhealthy_timeout = 5000" "primary_demote_timeout = 5000"; do
        as_postgres psql -q -h 127.0.0.1 -p "$MONITOR_PORT" -d pg_auto_failover -c "ALTER SYSTEM SET pgautofailover.$setting"
    done
    as_postgres psql -q -h 127.0.0.1 -p "$MONITOR_PORT" -d pg_auto_failover -c "SELECT pg_reload_conf()" >/dev/null
}

pg_wait_state() {  # until `pg_autoctl show state` has the primary and a secondary
    for _ in $(seq 240); do
        local state
        state=$(as_postgres pg_autoctl show state --pgdata "$HA_DIR/pg/monitor" 2>/dev/null || true)
        if grep -q "| *primary *| *primary" <<<"$state" && grep -q "| *secondary *| *secondary" <<<"$state"; then
            return 0
        fi
        sleep 0.5
    done
    echo "ha: the formation did not reach primary + secondary:" >&2
    as_postgres pg_autoctl show state --pgdata "$HA_DIR/pg/monitor" >&2 || true
    return 1
}

pg_up() {
    mkdir -p "$HA_DIR/pg"
    chown postgres "$HA_DIR" "$HA_DIR/pg"
    (cd /tmp && as_postgres pg_autoctl create monitor --pgdata "$HA_DIR/pg/monitor" --pgport "$MONITOR_PORT" \
        --hostname 127.0.0.1 --auth trust --no-ssl >"$HA_DIR/pg/create-monitor.log" 2>&1)
    pg_low_memory monitor
    pg_run monitor
    local i=0
    for port in "${PG_PORTS[@]}"; do
        i=$((i + 1))
        for _ in $(seq 60); do as_postgres pg_isready -q -h 127.0.0.1 -p "$MONITOR_PORT" && break; sleep 0.5; done
        [ "$i" = 1 ] && (cd /tmp && pg_fast_failover)
        (cd /tmp && as_postgres pg_autoctl create postgres --pgdata "$HA_DIR/pg/node$i" --pgport "$port" \
            --hostname 127.0.0.1 --name "node$i" --auth trust --no-ssl --monitor "$MONITOR_URI" \
            >"$HA_DIR/pg/create-node$i.log" 2>&1)
        [ "$i" = 1 ] && pg_low_memory node1  # node2 is a base backup of node1: it has it too
        pg_run "node$i"
        [ "$i" = 1 ] && for _ in $(seq 60); do as_postgres pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
    done
    pg_wait_state
}

pg_down() {
    for name in node2 node1 monitor; do
        [ -d "$HA_DIR/pg/$name" ] && (cd /tmp && as_postgres pg_autoctl stop --pgdata "$HA_DIR/pg/$name" 2>/dev/null) || true
    done
    for _ in $(seq 60); do
        pgrep -f "pg_autoctl.*$HA_DIR/pg|postgres -D $HA_DIR/pg" >/dev/null || break
        sleep 0.5
    done
    # Whatever did not stop in 30 s (a keeper a drill left behind): its own pids, by data directory.
    for pid in $(pgrep -f "pg_autoctl.*$HA_DIR/pg|postgres -D $HA_DIR/pg" || true); do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$HA_DIR/pg"
    rm -rf "/var/lib/postgresql/.config/pg_autoctl$HA_DIR" "/var/lib/postgresql/.local/share/pg_autoctl$HA_DIR"
}

print_env() {
    local amqp="" port
    for port in "${AMQP_PORTS[@]}"; do amqp+="${amqp:+,}amqp://guest:guest@127.0.0.1:$port/"; done
    echo "export DATABASE_URL='postgresql://postgres@127.0.0.1:${PG_PORTS[0]},127.0.0.1:${PG_PORTS[1]}/postgres?target_session_attrs=read-write'"
    echo "export AMQP_URL='$amqp'"
    echo "export RABBITMQ_NODENAME='$(node_name 1)'  # where rabbitmqctl adds and deletes the tests' vhosts"
    echo "export GATEWAY_HA_DIR='$HA_DIR'"
}

case "${1:-}" in
up)
    install_missing
    mkdir -p "$HA_DIR"
    rabbit_up
    pg_up
    print_env | tee "$HA_DIR/env"
    ;;
start-rabbit) rabbit_start_one "$2" ;;
start-pg) pg_run "$2" ;;  # a data node's keeper again (after a drill killed its host): it rejoins
down)
    rabbit_down
    pg_down
    rm -rf "$HA_DIR"
    ;;
env) print_env ;;
*)
    echo "usage: $0 up|down|env|start-rabbit N|start-pg nodeN" >&2
    exit 2
    ;;
esac
