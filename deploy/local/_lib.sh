# shellcheck shell=bash
# Shared helpers for deploy/local/{up,down,ps}. Sourced, not executed.
# shellcheck disable=SC2034  # variables are used by the scripts sourcing this

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
LOCAL="$ROOT/.local"
RUN_DIR="$LOCAL/run"
LOG_DIR="$LOCAL/logs"
KAFKA_DIR="$LOCAL/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
REDIS_DIR="$LOCAL/redis"
# Extra clusters (up --brokers N / --sasl-ssl) live in $CLUSTERS_DIR/<first port>/; CL is set
# by use_cluster while working on one of them, empty for the default single-node set.
CLUSTERS_DIR="$LOCAL/clusters"
CL=""

log() { printf '[gradeflow] %s\n' "$*"; }
die() { printf '[gradeflow] ERROR: %s\n' "$*" >&2; exit 1; }

# --- addresses from env ------------------------------------------------------

# GRADEFLOW_KAFKA_BOOTSTRAP: "host:port[,host:port...]", optionally "kafka://..."
parse_kafka() {
  local raw="${GRADEFLOW_KAFKA_BOOTSTRAP:-localhost:9092}" first
  first="${raw%%,*}"
  first="${first#*://}"
  first="${first%%/*}"
  KAFKA_HOST="${first%:*}"
  KAFKA_PORT="${first##*:}"
  [[ "$first" == *:* ]] || KAFKA_PORT=9092
  [[ "$KAFKA_PORT" =~ ^[0-9]+$ ]] || die "cannot parse port from GRADEFLOW_KAFKA_BOOTSTRAP='$raw'"
  KAFKA_CPORT=$((KAFKA_PORT + 1))
}

# GRADEFLOW_REDIS_URL: redis://[user:pass@]host[:port][/db]
parse_redis() {
  local raw="${GRADEFLOW_REDIS_URL:-redis://localhost:6379/0}" rest hostport
  rest="${raw#*://}"
  hostport="${rest%%/*}"
  hostport="${hostport##*@}"
  REDIS_DB=0
  if [[ "$rest" == */* ]]; then
    REDIS_DB="${rest#*/}"
    REDIS_DB="${REDIS_DB%%\?*}"
    [[ "$REDIS_DB" =~ ^[0-9]+$ ]] || REDIS_DB=0
  fi
  REDIS_HOST="${hostport%:*}"
  if [[ "$hostport" == *:* ]]; then REDIS_PORT="${hostport##*:}"; else REDIS_PORT=6379; fi
  [[ "$REDIS_PORT" =~ ^[0-9]+$ ]] || die "cannot parse port from GRADEFLOW_REDIS_URL='$raw'"
}

# --- processes -----------------------------------------------------------------

# --- clusters ------------------------------------------------------------------

# use_cluster <port>: point RUN_DIR/LOG_DIR (and is_ours) at the cluster keyed by <port>.
use_cluster() {
  CL="$CLUSTERS_DIR/$1"
  RUN_DIR="$CL/run"
  LOG_DIR="$CL/logs"
}

# use_default: back to the default single-node set (.local/run, .local/logs).
use_default() {
  CL=""
  RUN_DIR="$LOCAL/run"
  LOG_DIR="$LOCAL/logs"
}

# each_selected <fn>: run <fn> in every set GRADEFLOW_KAFKA_BOOTSTRAP's port selects (call
# parse_kafka first): the cluster in $CLUSTERS_DIR/<port> if there is one, and the default set if
# its Kafka runs (or last ran) on that port, or if it has no Kafka and no cluster has the port.
# Both, when a cluster and the single-node set used the same port one after the other: each set
# keeps its own pid files, so `down` stops whatever `up` started there, whichever ran first.
# Returns 1 when the port selects neither, so that a `down` for a cluster already gone never
# stops the default servers others use.
each_selected() {
  local fn="$1" found=1 info addr
  if [[ -d "$CLUSTERS_DIR/$KAFKA_PORT" ]]; then
    use_cluster "$KAFKA_PORT"
    "$fn"
    found=0
  fi
  use_default
  info="$RUN_DIR/kafka.info"
  if [[ -f "$info" ]]; then
    addr="$(cut -d' ' -f2 "$info" 2>/dev/null)"
    if [[ "${addr##*:}" == "$KAFKA_PORT" ]]; then
      "$fn"
      found=0
    fi
  elif ((found)); then
    "$fn"
    found=0
  fi
  return "$found"
}

# cluster_ports: the ports keying existing cluster dirs, one a line.
cluster_ports() {
  local d
  shopt -s nullglob
  for d in "$CLUSTERS_DIR"/*/; do
    d="${d%/}"; d="${d##*/}"
    [[ "$d" =~ ^[0-9]+$ ]] && echo "$d"
  done
  shopt -u nullglob
}

# props_of <service>: the properties file a Kafka server of the current set was started with.
props_of() {
  if [[ -n "$CL" ]]; then echo "$CL/config/$1.properties"; else echo "$KAFKA_PROPS"; fi
}

# is_ours <service> <pid>: true if pid is alive and is the server up started.
is_ours() {
  local svc="$1" pid="$2" cmd cwd
  [[ "$pid" =~ ^[0-9]+$ ]] && [[ -r "/proc/$pid/cmdline" ]] || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  case "$svc" in
    kafka*|controller*) [[ "$cmd" == *kafka.Kafka* && "$cmd" == *" $(props_of "$svc")"* ]] ;;
    redis*)
      # redis rewrites its process title, so also check its working dir (--dir).
      cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null)" || return 1
      [[ "$cmd" == *redis-server* && "$cwd" == "$REDIS_DIR" ]] ;;
    *) return 1 ;;
  esac
}

# live_pid <service>: print pid from the pid file if that process is ours & alive.
live_pid() {
  local f="$RUN_DIR/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  is_ours "$1" "$pid" || return 1
  echo "$pid"
}

# port_in_use <port>: true if something listens on TCP <port> (any address).
port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# port_owner <port>: pid/name of the listener, best effort ("" if unknown).
port_owner() {
  command -v ss >/dev/null 2>&1 || return 0
  local u
  u="$(ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -1)" || true
  [[ -n "$u" ]] && u="${u#users:((\"}" && echo "(${u%%\"*} pid ${u##*pid=})"
  return 0
}

# stop_service <service>: SIGTERM, wait up to 30 s, SIGKILL. Removes pid/info files.
stop_service() {
  local svc="$1" pid i
  if pid="$(live_pid "$svc")"; then
    log "stopping $svc (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
      if ! is_ours "$svc" "$pid"; then break; fi
      sleep 0.1
    done
    if is_ours "$svc" "$pid"; then
      log "$svc did not stop within 30 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
    fi
    rm -f "$RUN_DIR/$svc.pid" "$RUN_DIR/$svc.info"
    return 0
  fi
  rm -f "$RUN_DIR/$svc.pid" "$RUN_DIR/$svc.info"
  return 1
}

# services known from pid files
known_services() {
  local f
  shopt -s nullglob
  for f in "$RUN_DIR"/*.pid; do basename "$f" .pid; done
  shopt -u nullglob
}

# in_stop_order: the service names on stdin, brokers (kafka*) first, then the rest, KRaft
# controllers last (a broker's controlled shutdown needs its controller).
in_stop_order() {
  sort | awk '/^controller/ { c = c $0 "\n"; next } { print } END { printf "%s", c }'
}

services_in_stop_order() {
  known_services | in_stop_order
}

# What this run of `up` started, by service name (its pid file is in $RUN_DIR). A failed `up`
# stops exactly these on its way out (stop_started_on_failure, an EXIT trap), so that it never
# leaves a controller or half a set running; servers that ran before it are left alone.
STARTED=()

stop_started_on_failure() {
  local rc=$? svc
  ((rc != 0)) || return 0
  ((${#STARTED[@]} > 0)) || return 0
  log "up failed: stopping what it started (${STARTED[*]})"
  for svc in $(printf '%s\n' "${STARTED[@]}" | in_stop_order); do
    stop_own_child "$svc" || stop_service "$svc" || true
  done
  STARTED=()
}

# stop_own_child <service>: stop a server this shell started, even one that has not yet become
# the server (is_ours cannot recognise a JVM still starting through setsid and nohup): its pid
# file must name a live child of this very shell, which /proc/<pid>/stat says. SIGTERM, up to
# 30 s, then SIGKILL; removes the pid and info files. Returns 1 when it is no child of ours.
stop_own_child() {
  local svc="$1" pid stat i
  pid="$(cat "$RUN_DIR/$svc.pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"  # after the command name, which may hold spaces: "<state> <ppid> ..."
  [[ "$(cut -d' ' -f2 <<<"$stat")" == "$$" ]] || return 1
  log "stopping $svc (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null || [[ ! -d "/proc/$pid" ]] && break
    sleep 0.1
  done
  if [[ -d "/proc/$pid" ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
    log "$svc did not stop within 30 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  rm -f "$RUN_DIR/$svc.pid" "$RUN_DIR/$svc.info"
}

# Java classpath / options for Kafka tools (short-lived JVMs).
# Usage: kafka_tool <main-class> args...   (optionally prefixed: TOOL_TIMEOUT=30)
kafka_tool() {
  local t=()
  [[ -n "${TOOL_TIMEOUT:-}" ]] && t=(timeout "$TOOL_TIMEOUT")
  "${t[@]}" java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m \
    -Dlog4j2.configurationFile="$KAFKA_DIR/tools-log4j2.xml" \
    -cp "$KAFKA_LIBS/*" "$@"
}
