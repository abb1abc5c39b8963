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

# use_selected: the set GRADEFLOW_KAFKA_BOOTSTRAP names (call parse_kafka first): the cluster in
# $CLUSTERS_DIR/<port> if there is one, else the default set, but only if its Kafka runs (or
# last ran) on that port or it has no Kafka. Returns 1 when the env names neither, so that a
# `down` for a cluster already gone never stops the default servers others use.
use_selected() {
  if [[ -d "$CLUSTERS_DIR/$KAFKA_PORT" ]]; then
    use_cluster "$KAFKA_PORT"
    return 0
  fi
  use_default
  local info="$RUN_DIR/kafka.info" addr
  [[ -f "$info" ]] || return 0
  addr="$(cut -d' ' -f2 "$info" 2>/dev/null)"
  [[ "${addr##*:}" == "$KAFKA_PORT" ]]
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

# services in stop order: brokers (kafka*) first, then the rest, KRaft controllers last
# (a broker's controlled shutdown needs its controller).
services_in_stop_order() {
  known_services | sort | awk '/^controller/ { c = c $0 "\n"; next } { print } END { printf "%s", c }'
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
