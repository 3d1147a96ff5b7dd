#!/usr/bin/env bash
# Local stack for order-viewer: a private PostgreSQL 15 cluster and a single-node
# Apache Kafka broker (KRaft, broker+controller in one JVM), no Docker.
#
# Usage: scripts/stack.sh COMMAND
#   install          install PostgreSQL 15 if missing, fetch the Kafka jars if missing
#   install-browser  install Debian's chromium if /usr/bin/chromium is missing
#   install-bench-tools  install wrk (the HTTP load generator of make bench) if missing
#   install-compose  install Debian's docker-compose (validates docker-compose.yml) if missing
#   up               install, then start both servers (reuses running ones) and wait until ready
#   down             stop both servers gracefully, keep the data
#   status           tell whether each server is running
#   pg-start | pg-stop | pg-crash            start / fast stop / immediate-mode stop PostgreSQL
#   kafka-start | kafka-stop | kafka-kill    start / SIGTERM and wait / SIGKILL the broker
#   destroy          down, then delete STACK_DIR
#
# Environment (defaults):
#   STACK_DIR              <project>/.stack/local   data, logs, pid files, sockets of this instance
#   KAFKA_LIBS_DIR         <project>/.stack/kafka-libs   broker jars, shared by all instances
#   PG_PORT                5432
#   KAFKA_PORT             9092
#   KAFKA_CONTROLLER_PORT  9093
#   KAFKA_HEAP_OPTS        -Xms256m -Xmx512m
#   PG_START_TIMEOUT       120 (seconds)      KAFKA_START_TIMEOUT  120 (seconds)
set -euo pipefail

PROJECT_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KAFKA_POM="$PROJECT_ROOT/scripts/kafka/pom.xml"
KAFKA_LOG_CONFIG="$PROJECT_ROOT/scripts/kafka/log4j2.yaml"

# Lexically normalised (no "..") so the safety check of `destroy` cannot be fooled.
absolute_path() { realpath -m -- "$1"; }

STACK_DIR="$(absolute_path "${STACK_DIR:-$PROJECT_ROOT/.stack/local}")"
KAFKA_LIBS_DIR="$(absolute_path "${KAFKA_LIBS_DIR:-$PROJECT_ROOT/.stack/kafka-libs}")"
PG_PORT="${PG_PORT:-5432}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-120}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-60}"

PG_MAJOR=15
PG_APP_ROLE=order_viewer
PG_APP_PASSWORD=order_viewer
PG_APP_DB=order_viewer
PG_SUPERUSER=postgres
PG_DATA="$STACK_DIR/postgres"
PG_LOG="$STACK_DIR/postgres.log"

KAFKA_DATA="$STACK_DIR/kafka-data"
KAFKA_PROPERTIES="$STACK_DIR/kafka.properties"
KAFKA_CLUSTER_ID_FILE="$STACK_DIR/kafka-cluster-id"
KAFKA_LOG="$STACK_DIR/kafka.log"
KAFKA_PID_FILE="$STACK_DIR/kafka.pid"
KAFKA_LIBS_MARKER="$KAFKA_LIBS_DIR/.complete"

# Files are shared with the postgres user when we run as root.
umask 022

say() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Connecting is the only check that works without ss/netstat and for any owner.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

show_log_tail() {
    local file=$1
    if [ -f "$file" ]; then
        printf -- '--- last lines of %s ---\n' "$file" >&2
        tail -n 40 "$file" >&2
        printf -- '--- end of %s ---\n' "$file" >&2
    fi
}

short_hash() { printf '%s' "$1" | sha256sum | cut -c1-12; }

# ---------------------------------------------------------------- install

find_pg_bindir() {
    local candidate
    for candidate in "${PG_BIN:-}" "/usr/lib/postgresql/$PG_MAJOR/bin" \
        "$(pg_config --bindir 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate/initdb" ] && [ -x "$candidate/pg_ctl" ] &&
            "$candidate/postgres" --version 2>/dev/null | grep -q " $PG_MAJOR\."; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# Debian's package creates and starts a system cluster on 5432; ours needs the port.
stop_debian_system_cluster() {
    local conf="/etc/postgresql/$PG_MAJOR/main"
    [ -d "$conf" ] || return 0
    say "stopping Debian's system cluster $PG_MAJOR/main and setting it to manual start"
    as_root pg_ctlcluster "$PG_MAJOR" main stop >/dev/null 2>&1 || true
    printf 'manual\n' | as_root tee "$conf/start.conf" >/dev/null
}

install_postgres() {
    if PG_BIN="$(find_pg_bindir)"; then
        return 0
    fi
    say "installing PostgreSQL $PG_MAJOR (apt)"
    apt_install "postgresql-$PG_MAJOR"
    stop_debian_system_cluster
    PG_BIN="$(find_pg_bindir)" || die "PostgreSQL $PG_MAJOR binaries not found after install"
}

java_major_version() {
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1
}

install_java_and_maven() {
    local java_major
    java_major="$(java_major_version 2>/dev/null || true)"
    if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
        say "installing Java 17 (apt)"
        apt_install openjdk-17-jre-headless
    fi
    if ! command -v mvn >/dev/null 2>&1; then
        say "installing Maven (apt)"
        apt_install maven
    fi
}

kafka_libs_fingerprint() { sha256sum <"$KAFKA_POM" | cut -d' ' -f1; }

kafka_version() { sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM"; }

kafka_libs_complete() {
    [ -f "$KAFKA_LIBS_MARKER" ] &&
        [ "$(cat "$KAFKA_LIBS_MARKER")" = "kafka $(kafka_version) pom-sha256 $(kafka_libs_fingerprint)" ]
}

install_kafka_libs() {
    kafka_libs_complete && return 0
    install_java_and_maven
    mkdir -p "$(dirname "$KAFKA_LIBS_DIR")"
    # Several stack instances may run `up` at once; only one fetches.
    exec 8>"$KAFKA_LIBS_DIR.lock"
    flock 8
    if ! kafka_libs_complete; then
        local staging="$KAFKA_LIBS_DIR.tmp.$$" mvn_log
        mvn_log="$(mktemp)"
        say "fetching Kafka $(kafka_version) jars with Maven into $KAFKA_LIBS_DIR"
        rm -rf "$staging"
        if ! mvn -q -B -ntp -Dstyle.color=never -f "$KAFKA_POM" \
            dependency:copy-dependencies -DoutputDirectory="$staging" >"$mvn_log" 2>&1; then
            show_log_tail "$mvn_log"
            rm -rf "$staging" "$mvn_log"
            die "Maven could not fetch the Kafka jars"
        fi
        rm -f "$mvn_log"
        ls "$staging"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after fetch"
        printf 'kafka %s pom-sha256 %s\n' "$(kafka_version)" "$(kafka_libs_fingerprint)" >"$staging/.complete"
        rm -rf "$KAFKA_LIBS_DIR"
        mv "$staging" "$KAFKA_LIBS_DIR"
    fi
    flock -u 8
    exec 8>&-
}

cmd_install() {
    install_postgres
    install_kafka_libs
}

cmd_install_browser() {
    [ -x /usr/bin/chromium ] && return 0
    say "installing chromium (apt)"
    apt_install chromium
}

cmd_install_bench_tools() {
    command -v wrk >/dev/null 2>&1 && return 0
    say "installing wrk (apt)"
    apt_install wrk
}

cmd_install_compose() {
    command -v docker-compose >/dev/null 2>&1 && return 0
    say "installing docker-compose (apt)"
    apt_install docker-compose
}

# ---------------------------------------------------------------- stack dir

ensure_stack_dir() {
    mkdir -p "$STACK_DIR"
}

# Serialises commands on the same STACK_DIR (e.g. two `up` at once).
lock_stack_dir() {
    ensure_stack_dir
    exec 9>"$STACK_DIR/.lock"
    flock 9
}

lock_existing_stack_dir() {
    [ -d "$STACK_DIR" ] || return 0
    exec 9>"$STACK_DIR/.lock"
    flock 9
}

temp_roots() {
    local root
    for root in "${TMPDIR:-}" /tmp /var/tmp; do
        [ -n "$root" ] && [ -d "$root" ] && (cd "$root" && pwd -P)
    done
}

is_below_temp_dir() {
    local path root
    path="$(cd "$1" 2>/dev/null && pwd -P || printf '%s' "$1")"
    while read -r root; do
        case "$path" in "$root"/?*) return 0 ;; esac
    done < <(temp_roots)
    return 1
}

# ---------------------------------------------------------------- PostgreSQL

as_pg_owner() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@" 8>&- 9>&-)
    else
        "$@" 8>&- 9>&-
    fi
}

pg_socket_dir() {
    local dir="$STACK_DIR/pgsock"
    # sun_path holds 107 bytes; the socket file is "<dir>/.s.PGSQL.<port>".
    if [ $((${#dir} + ${#PG_PORT} + 11)) -gt 100 ]; then
        dir="/tmp/order-viewer-pg-$(short_hash "$STACK_DIR")"
    fi
    printf '%s\n' "$dir"
}

# PostgreSQL refuses to run as root, so as root the cluster belongs to `postgres`,
# which must be able to traverse every parent of STACK_DIR.
ensure_postgres_can_reach_stack_dir() {
    is_root || return 0
    id postgres >/dev/null 2>&1 || die "user 'postgres' does not exist (is postgresql-$PG_MAJOR installed?)"
    runuser -u postgres -- test -x "$STACK_DIR" && return 0
    local dir="$STACK_DIR"
    local blocked=()
    while [ "$dir" != "/" ]; do
        dir="$(dirname "$dir")"
        runuser -u postgres -- test -x "$dir" || blocked+=("$dir")
    done
    blocked+=("$STACK_DIR")
    for dir in "${blocked[@]}"; do
        runuser -u postgres -- test -x "$dir" && continue
        # e.g. `mktemp -d` makes 0700 dirs: search permission is all postgres needs.
        if [ "$(stat -c %u "$dir")" = "$(id -u)" ] && is_below_temp_dir "$dir"; then
            chmod o+x "$dir"
        else
            die "the postgres user cannot traverse $dir (needed for $PG_DATA); chmod o+x it or choose another STACK_DIR"
        fi
    done
}

pg_ctl_cmd() { as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" "$@"; }

pg_is_running() {
    [ -f "$PG_DATA/PG_VERSION" ] || return 1
    PG_BIN="${PG_BIN:-$(find_pg_bindir)}" || return 1
    pg_ctl_cmd status >/dev/null 2>&1
}

pg_init_cluster() {
    [ -f "$PG_DATA/PG_VERSION" ] && return 0
    say "initialising PostgreSQL cluster in $PG_DATA"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA"
    chmod 700 "$PG_DATA"
    if is_root; then
        chown postgres:postgres "$PG_DATA"
    fi
    local init_log="$STACK_DIR/initdb.log"
    if ! as_pg_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$init_log" 2>&1; then
        show_log_tail "$init_log"
        die "initdb failed"
    fi
    # Ports and paths follow the environment: stack.conf is rewritten on every start.
    printf "\ninclude_if_exists = 'stack.conf'\n" | as_pg_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_conf_quote() { printf "'%s'" "${1//\'/\'\'}"; }

pg_write_stack_conf() {
    local socket_dir=$1
    as_pg_owner tee "$PG_DATA/stack.conf" >/dev/null <<EOF
# Written by scripts/stack.sh on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = $(pg_conf_quote "$socket_dir")
max_connections = 200
shared_buffers = 256MB
# The service promises no order is lost: keep durability real.
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

pg_superuser_psql() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$(pg_socket_dir)" -p "$PG_PORT" -U "$PG_SUPERUSER" "$@"
}

pg_provision_app_role() {
    pg_superuser_psql -d postgres >/dev/null <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_APP_ROLE') THEN
    CREATE ROLE $PG_APP_ROLE LOGIN CREATEDB PASSWORD '$PG_APP_PASSWORD';
  ELSE
    ALTER ROLE $PG_APP_ROLE LOGIN CREATEDB PASSWORD '$PG_APP_PASSWORD';
  END IF;
END
\$\$;
-- Lets the benchmarks settle the server (CHECKPOINT) before timing HTTP; a local stack only.
GRANT pg_checkpoint TO $PG_APP_ROLE;
SELECT 'CREATE DATABASE $PG_APP_DB OWNER $PG_APP_ROLE'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_APP_DB')
\gexec
EOF
}

pg_app_connection_works() {
    PGPASSWORD="$PG_APP_PASSWORD" PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -At \
        -h 127.0.0.1 -p "$PG_PORT" -U "$PG_APP_ROLE" -d "$PG_APP_DB" -c 'select 1' 2>/dev/null | grep -qx 1
}

pg_wait_app_ready() {
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    until pg_app_connection_works; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log_tail "$PG_LOG"
            die "PostgreSQL does not accept connections for $PG_APP_ROLE on 127.0.0.1:$PG_PORT"
        fi
        sleep 0.2
    done
}

pg_report_ready() {
    say "postgres ready: postgresql://$PG_APP_ROLE:$PG_APP_PASSWORD@127.0.0.1:$PG_PORT/$PG_APP_DB"
}

cmd_pg_start() {
    install_postgres
    ensure_stack_dir
    if pg_is_running; then
        pg_wait_app_ready
        pg_report_ready
        return 0
    fi
    ensure_postgres_can_reach_stack_dir
    if port_in_use "$PG_PORT"; then
        die "port $PG_PORT is already in use by another process (a system PostgreSQL? try: pg_lsclusters)"
    fi
    pg_init_cluster
    local socket_dir
    socket_dir="$(pg_socket_dir)"
    mkdir -p "$socket_dir"
    touch "$PG_LOG"
    if is_root; then
        chown postgres:postgres "$socket_dir" "$PG_LOG"
    fi
    pg_write_stack_conf "$socket_dir"
    if ! pg_ctl_cmd start -w -t "$PG_START_TIMEOUT" -l "$PG_LOG" >/dev/null 2>&1; then
        show_log_tail "$PG_LOG"
        die "PostgreSQL did not start (data $PG_DATA, port $PG_PORT)"
    fi
    pg_provision_app_role
    pg_wait_app_ready
    pg_report_ready
}

pg_stop_with_mode() {
    local mode=$1
    if ! pg_is_running; then
        say "postgres: not running"
        return 0
    fi
    if ! pg_ctl_cmd stop -m "$mode" -w -t 60 >/dev/null 2>&1; then
        show_log_tail "$PG_LOG"
        die "PostgreSQL did not stop ($mode)"
    fi
    say "postgres stopped ($mode)"
}

cmd_pg_stop() { pg_stop_with_mode fast; }
cmd_pg_crash() { pg_stop_with_mode immediate; }

# ---------------------------------------------------------------- Kafka

kafka_pid() {
    [ -f "$KAFKA_PID_FILE" ] || return 1
    local pid
    pid="$(cat "$KAFKA_PID_FILE")"
    [ -n "$pid" ] || return 1
    # Guards against a recycled pid: the process must be our broker for this STACK_DIR.
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $KAFKA_PROPERTIES" || return 1
    printf '%s\n' "$pid"
}

kafka_is_running() { kafka_pid >/dev/null; }

kafka_write_properties() {
    cat >"$KAFKA_PROPERTIES" <<EOF
# Written by scripts/stack.sh on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=3
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# After a SIGKILL the restarted broker cannot register until the old incarnation's
# session expires (default 9s, plus 2s heartbeats); keep kill+start tests quick.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
EOF
}

KAFKA_JVM_FLAGS=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$KAFKA_LOG_CONFIG")

# For the short-lived tools (storage format); small heap, quick start.
kafka_tool() {
    java -Xmx256m -XX:TieredStopAtLevel=1 "${KAFKA_JVM_FLAGS[@]}" -cp "$KAFKA_LIBS_DIR/*" "$@"
}

kafka_format_storage() {
    [ -f "$KAFKA_DATA/meta.properties" ] && return 0
    local cluster_id format_log="$STACK_DIR/kafka-format.log"
    if [ ! -s "$KAFKA_CLUSTER_ID_FILE" ]; then
        kafka_tool kafka.tools.StorageTool random-uuid >"$KAFKA_CLUSTER_ID_FILE.tmp"
        mv "$KAFKA_CLUSTER_ID_FILE.tmp" "$KAFKA_CLUSTER_ID_FILE"
    fi
    cluster_id="$(cat "$KAFKA_CLUSTER_ID_FILE")"
    say "formatting Kafka storage in $KAFKA_DATA (cluster id $cluster_id)"
    if ! kafka_tool kafka.tools.StorageTool format --ignore-formatted \
        -t "$cluster_id" -c "$KAFKA_PROPERTIES" >"$format_log" 2>&1; then
        show_log_tail "$format_log"
        die "formatting Kafka storage failed"
    fi
}

KAFKA_START_MARKER='=== kafka start by stack.sh'

# True when the broker's latest run (the lines after the last start marker) has
# logged that it finished starting.
kafka_log_says_started() {
    [ -f "$KAFKA_LOG" ] &&
        awk -v marker="$KAFKA_START_MARKER" '
            index($0, marker) == 1 { started = 0 }
            /Kafka Server started/ { started = 1 }
            END { exit !started }' "$KAFKA_LOG"
}

kafka_launch() {
    install_kafka_libs
    ensure_stack_dir
    kafka_is_running && return 0
    local port
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        port_in_use "$port" && die "port $port is already in use by another process (Kafka of another STACK_DIR?)"
    done
    mkdir -p "$KAFKA_DATA"
    kafka_write_properties
    kafka_format_storage
    rm -f "$KAFKA_PID_FILE"
    printf '%s at %s ===\n' "$KAFKA_START_MARKER" "$(date '+%F %T')" >>"$KAFKA_LOG"
    KAFKA_LAUNCH_TIME=$SECONDS
    local java_args
    read -r -a java_args <<<"$KAFKA_HEAP_OPTS"
    # setsid: the broker must outlive the caller's process group (test runners, Ctrl-C).
    # The inner shell writes its own pid and then execs java, so the pid is the JVM's.
    # 8>&- 9>&-: the broker must not inherit (and hold forever) this script's flocks.
    # shellcheck disable=SC2016  # $$ and $@ are for the inner shell
    nohup setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PID_FILE" \
        java "${java_args[@]}" "${KAFKA_JVM_FLAGS[@]}" -cp "$KAFKA_LIBS_DIR/*" kafka.Kafka "$KAFKA_PROPERTIES" \
        </dev/null >>"$KAFKA_LOG" 2>&1 8>&- 9>&- &
}

kafka_wait_ready() {
    local deadline=$((SECONDS + KAFKA_START_TIMEOUT)) launched_at=${KAFKA_LAUNCH_TIME:-$SECONDS}
    until kafka_log_says_started && port_in_use "$KAFKA_PORT"; do
        # Right after launch the pid file may still hold the launcher shell's pid.
        if ! kafka_is_running && [ $((SECONDS - launched_at)) -ge 10 ]; then
            show_log_tail "$KAFKA_LOG"
            die "Kafka is not running (it exited during startup?)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log_tail "$KAFKA_LOG"
            die "Kafka not ready on 127.0.0.1:$KAFKA_PORT after ${KAFKA_START_TIMEOUT}s"
        fi
        sleep 0.2
    done
    if [ -n "${KAFKA_LAUNCH_TIME:-}" ]; then
        kafka_report_ready " (started in $((SECONDS - KAFKA_LAUNCH_TIME))s)"
    else
        kafka_report_ready ""
    fi
}

kafka_report_ready() {
    say "kafka ready: 127.0.0.1:$KAFKA_PORT$1"
}

cmd_kafka_start() {
    kafka_launch
    kafka_wait_ready
}

wait_for_exit() {
    local pid=$1 timeout=$2
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

cmd_kafka_stop() {
    local pid
    if ! pid="$(kafka_pid)"; then
        say "kafka: not running"
        rm -f "$KAFKA_PID_FILE"
        return 0
    fi
    kill -TERM "$pid"
    if ! wait_for_exit "$pid" "$KAFKA_STOP_TIMEOUT"; then
        say "WARNING: Kafka (pid $pid) did not exit ${KAFKA_STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_for_exit "$pid" 30 || die "Kafka (pid $pid) survived SIGKILL"
    fi
    rm -f "$KAFKA_PID_FILE"
    say "kafka stopped"
}

cmd_kafka_kill() {
    local pid
    if ! pid="$(kafka_pid)"; then
        say "kafka: not running"
        rm -f "$KAFKA_PID_FILE"
        return 0
    fi
    kill -KILL "$pid"
    wait_for_exit "$pid" 30 || die "Kafka (pid $pid) survived SIGKILL"
    rm -f "$KAFKA_PID_FILE"
    say "kafka killed"
}

# ---------------------------------------------------------------- whole stack

cmd_up() {
    cmd_install
    # The broker boots in the background while PostgreSQL starts.
    kafka_launch
    cmd_pg_start
    kafka_wait_ready
}

cmd_down() {
    [ -d "$STACK_DIR" ] || { say "nothing to stop: $STACK_DIR does not exist"; return 0; }
    cmd_kafka_stop
    pg_stop_with_mode fast
}

# Status reports the ports the servers were started with, not the current environment's.
cmd_status() {
    local pid port
    if pg_is_running; then
        pid="$(sed -n 1p "$PG_DATA/postmaster.pid" 2>/dev/null || true)"
        port="$(sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null || true)"
        say "postgres: running on 127.0.0.1:${port:-?} (pid $pid, data $PG_DATA)"
    else
        say "postgres: stopped"
    fi
    if pid="$(kafka_pid)"; then
        port="$(sed -n 's/^advertised.listeners=PLAINTEXT:\/\/\(.*\)$/\1/p' "$KAFKA_PROPERTIES" 2>/dev/null || true)"
        say "kafka: running on ${port:-?} (pid $pid, data $KAFKA_DATA)"
    else
        say "kafka: stopped"
    fi
}

stack_dir_is_safe_to_delete() {
    case "/$STACK_DIR/" in
        */.stack/?*) return 0 ;;
    esac
    is_below_temp_dir "$STACK_DIR"
}

refuse_unsafe_destroy() {
    stack_dir_is_safe_to_delete ||
        die "refusing to delete $STACK_DIR: it is neither below a .stack directory nor below the temp dir"
}

cmd_destroy() {
    [ -d "$STACK_DIR" ] || { say "nothing to destroy: $STACK_DIR does not exist"; return 0; }
    cmd_down
    local socket_dir
    socket_dir="$(pg_socket_dir)"
    case "$socket_dir" in
        /tmp/order-viewer-pg-*) rm -rf "$socket_dir" ;;
    esac
    rm -rf "$STACK_DIR"
    say "destroyed $STACK_DIR"
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

main() {
    local command="${1:-}"
    case "$command" in
        install) cmd_install ;;
        install-browser) cmd_install_browser ;;
        install-bench-tools) cmd_install_bench_tools ;;
        install-compose) cmd_install_compose ;;
        up) lock_stack_dir; cmd_up ;;
        down) lock_existing_stack_dir; cmd_down ;;
        status) cmd_status ;;
        pg-start) lock_stack_dir; cmd_pg_start ;;
        pg-stop) lock_existing_stack_dir; cmd_pg_stop ;;
        pg-crash) lock_existing_stack_dir; cmd_pg_crash ;;
        kafka-start) lock_stack_dir; cmd_kafka_start ;;
        kafka-stop) lock_existing_stack_dir; cmd_kafka_stop ;;
        kafka-kill) lock_existing_stack_dir; cmd_kafka_kill ;;
        destroy) refuse_unsafe_destroy; lock_existing_stack_dir; cmd_destroy ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
