#!/usr/bin/env bash
# What `make run` and `make test` need from the machine, made true or named:
# PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672, its management API on 15672
# (unless DATABASE_URL / AMQP_URL point elsewhere), and, with --browser, Debian's Chromium for the ops console's browser test.
#
# Each service answering is left alone. One installed but stopped is started. One missing is
# installed from Debian's packages when we are root (apt-get), with PostgreSQL's loopback
# logins for the postgres user set to trust, as the tests and `make run` connect without a
# password; otherwise the script stops and prints the command to run.
set -euo pipefail

browser=0
[ "${1:-}" = "--browser" ] && browser=1

say() { echo "services: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    local name=$1 port=$2
    for _ in $(seq 1 120); do
        port_open "$port" && return 0
        sleep 1
    done
    say "$name did not open port $port"
    return 1
}
local_url() { # a URL unset or on this machine's loopback: ours to start
    [ -z "$1" ] || [[ "$1" == *"@127.0.0.1"* || "$1" == *"@localhost"* || "$1" == *"//127.0.0.1"* || "$1" == *"//localhost"* ]]
}

apt_updated=0
install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "$1 is not installed; run: sudo apt-get install -y $*"
        exit 1
    fi
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    say "installing $* from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres_clusters() { ls /etc/postgresql 2>/dev/null || true; }

ensure_postgres() {
    port_open 5432 && return 0
    local fresh=0
    if [ -z "$(postgres_clusters)" ]; then
        install postgresql
        fresh=1
    fi
    local version
    version=$(postgres_clusters | sort -n | tail -n 1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if [ "$fresh" = 1 ] && [ -w "$hba" ]; then
        # Only on a cluster this script just installed: the postgres user from the loopback, no password.
        sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
        say "PostgreSQL $version: loopback logins of user postgres trusted ($hba)"
    fi
    if [ "$(id -u)" != 0 ]; then
        say "PostgreSQL is installed but not running; run: sudo pg_ctlcluster $version main start"
        exit 1
    fi
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port PostgreSQL 5432
    until pg_isready -h 127.0.0.1 -p 5432 -q; do sleep 1; done
}

ensure_rabbitmq() {
    port_open 5672 && return 0
    command -v rabbitmq-server >/dev/null || install rabbitmq-server
    if [ "$(id -u)" != 0 ]; then
        say "RabbitMQ is installed but not running; run: sudo rabbitmq-server -detached"
        exit 1
    fi
    say "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port RabbitMQ 5672
    if command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q await_startup --timeout 120
    fi
}

# gatewayctl broker-account (and its test) use RabbitMQ's management HTTP API (port 15672).
ensure_rabbitmq_management() {
    port_open 15672 && return 0
    if [ "$(id -u)" != 0 ] || ! command -v rabbitmq-plugins >/dev/null; then
        say "RabbitMQ's management plugin is off; run: sudo rabbitmq-plugins enable rabbitmq_management"
        exit 1
    fi
    say "enabling RabbitMQ's management plugin"
    rabbitmq-plugins -q enable rabbitmq_management
    wait_port "RabbitMQ's management API" 15672
}

ensure_chromium() {
    [ -x /usr/bin/chromium ] || install chromium
}

local_url "${DATABASE_URL:-}" && ensure_postgres
local_url "${AMQP_URL:-}" && ensure_rabbitmq && ensure_rabbitmq_management
[ "$browser" = 1 ] && ensure_chromium
exit 0
