# shellcheck shell=bash
# Shared helpers for the Tollgate dev/test scripts. Source it, don't run it:
#
#   cd "$(dirname "$0")/.." && source scripts/services.sh
#
# Provides: ensure_tools, ensure_postgres, ensure_redis, ensure_venv,
# create_db, wait_http, free_port, random_hex, start_bg/stop_bg, and the
# control-API helpers (control_api_env, build_control_api, migrate_control_api,
# start_control_api). PostgreSQL/Redis that already run are reused and never
# stopped; on a fresh Debian machine they are installed and started.

set -euo pipefail

TOLLGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOLLGATE_STATE_DIR="$TOLLGATE_ROOT/.tollgate" # gitignored: pids, logs, keys
TOLLGATE_VENV="$TOLLGATE_ROOT/.venv"          # gitignored: python tooling

# Connection settings; pre-set values win. TOLLGATE_PG_BASE has no database
# name: append "/<db>". The password is ignored by trust auth and is set on
# a freshly installed local PostgreSQL (see ensure_postgres).
TOLLGATE_PG_BASE="${TOLLGATE_PG_BASE:-postgres://postgres:postgres@127.0.0.1:5432}"
TOLLGATE_PG_BASE="${TOLLGATE_PG_BASE%/}"
TOLLGATE_REDIS_URL="${TOLLGATE_REDIS_URL:-redis://127.0.0.1:6379}"
export TOLLGATE_PG_BASE TOLLGATE_REDIS_URL

TOLLGATE_BIN_DIR="${CARGO_TARGET_DIR:-$TOLLGATE_ROOT/target}/debug"
CONTROL_API_BIN="$TOLLGATE_BIN_DIR/tollgate-control-api"
GATEWAY_BIN="$TOLLGATE_BIN_DIR/tollgate-gateway"
MOCK_UPSTREAM_BIN="$TOLLGATE_BIN_DIR/tollgate-mock-upstream"

# ---------------------------------------------------------------- messages

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
  printf 'ERROR: %s\n' "$*" >&2
  exit 1
}

# Path relative to the repo root, for messages.
rel() { printf '%s\n' "${1#"$TOLLGATE_ROOT"/}"; }

# ---------------------------------------------------------------- apt

_TOLLGATE_APT_UPDATED=0

# apt_install PKG...: non-interactive install; `apt-get update` runs once.
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: $*"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: $*"
  log "installing Debian packages: $*"
  if [ "$_TOLLGATE_APT_UPDATED" = 0 ]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    _TOLLGATE_APT_UPDATED=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "$@"
}

# ---------------------------------------------------------------- tools

# ensure_tools: build/script prerequisites, each installed only if missing.
ensure_tools() {
  local pkgs=()
  command -v cmake >/dev/null 2>&1 || pkgs+=(cmake) # pingora's build
  command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl ca-certificates)
  command -v cc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
  command -v c++ >/dev/null 2>&1 || pkgs+=(g++)
  command -v make >/dev/null 2>&1 || pkgs+=(make)
  if ! command -v python3 >/dev/null 2>&1; then
    pkgs+=(python3 python3-venv)
  elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian ships venv's ensurepip separately.
    pkgs+=(python3-venv)
  fi
  if [ "${#pkgs[@]}" -gt 0 ]; then
    apt_install "${pkgs[@]}"
  fi
}

# random_hex NBYTES: 2*NBYTES lowercase hex characters.
random_hex() {
  od -An -tx1 -N"${1:-16}" /dev/urandom | tr -d ' \n'
}

# free_port: a currently free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

_is_local_host() {
  case "$1" in
    127.0.0.1 | localhost | ::1 | '[::1]') return 0 ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- postgres

# Splits TOLLGATE_PG_BASE into _PG_USER/_PG_PASS/_PG_HOST/_PG_PORT.
_pg_parse() {
  local re='^postgres(ql)?://(([^:@/]*)(:([^@/]*))?@)?([^:/?]+)(:([0-9]+))?$'
  [[ $TOLLGATE_PG_BASE =~ $re ]] ||
    die "TOLLGATE_PG_BASE must look like postgres://user:pass@host:port (no database), got: $TOLLGATE_PG_BASE"
  _PG_USER="${BASH_REMATCH[3]:-postgres}"
  _PG_PASS="${BASH_REMATCH[5]}"
  _PG_HOST="${BASH_REMATCH[6]}"
  _PG_PORT="${BASH_REMATCH[8]:-5432}"
}

_pg_ready() { pg_isready -q -h "$_PG_HOST" -p "$_PG_PORT" >/dev/null 2>&1; }

_pg_login_ok() {
  PGCONNECT_TIMEOUT=5 psql -XAtq "$TOLLGATE_PG_BASE/postgres" -c 'SELECT 1' >/dev/null 2>&1
}

# psql_admin ARGS...: psql against the maintenance database, stop on error.
psql_admin() {
  PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 "$TOLLGATE_PG_BASE/postgres" "$@"
}

# Runs a command as the postgres OS user (cwd / so it can read it).
_as_postgres() {
  if command -v runuser >/dev/null 2>&1; then
    (cd / && runuser -u postgres -- "$@")
  else
    local q
    printf -v q '%q ' "$@"
    (cd / && su postgres -s /bin/sh -c "$q")
  fi
}

# Installs (if needed) and starts a local cluster listening on _PG_PORT.
_pg_start_local() {
  if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    apt_install postgresql postgresql-client
    _pg_ready && return 0 # the package may have started its cluster
  fi
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not running on $_PG_HOST:$_PG_PORT; start it (needs root)"
  local ver cluster
  ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
  cluster="$(pg_lsclusters --no-header 2>/dev/null | awk -v p="$_PG_PORT" '$3 == p { print $1 " " $2; exit }')"
  if [ -z "$cluster" ]; then
    local name=main
    if pg_lsclusters --no-header 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" { f = 1 } END { exit !f }'; then
      name=tollgate
    fi
    log "creating PostgreSQL cluster $ver/$name on port $_PG_PORT"
    pg_createcluster --port "$_PG_PORT" "$ver" "$name"
    cluster="$ver $name"
  fi
  log "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086 # "$ver $name" is split on purpose
  pg_ctlcluster --skip-systemctl-redirect $cluster start
  local i
  for ((i = 0; i < 60; i++)); do
    _pg_ready && return 0
    sleep 0.5
  done
  die "PostgreSQL did not become ready on $_PG_HOST:$_PG_PORT"
}

# ensure_postgres: PostgreSQL reachable with TOLLGATE_PG_BASE.
ensure_postgres() {
  _pg_parse
  if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
    if _is_local_host "$_PG_HOST" && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
      apt_install postgresql postgresql-client
    else
      apt_install postgresql-client
    fi
  fi
  if ! _pg_ready; then
    _is_local_host "$_PG_HOST" || die "PostgreSQL at $_PG_HOST:$_PG_PORT is not reachable"
    _pg_start_local
  fi
  if ! _pg_login_ok; then
    # Fresh Debian install: peer/scram auth and no password yet. Give the
    # role the password from the URL through the local socket.
    if _is_local_host "$_PG_HOST" && [ "$(id -u)" -eq 0 ] && [ -n "$_PG_PASS" ] &&
      id postgres >/dev/null 2>&1; then
      log "setting the password of PostgreSQL role '$_PG_USER'"
      _as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$_PG_PORT" \
        -c "ALTER ROLE \"${_PG_USER//\"/\"\"}\" WITH LOGIN PASSWORD '${_PG_PASS//\'/\'\'}'" ||
        warn "could not set the password of role '$_PG_USER'"
    fi
    _pg_login_ok || die "cannot log in to PostgreSQL with $TOLLGATE_PG_BASE/postgres (check pg_hba.conf / password)"
  fi
  log "PostgreSQL ready at $_PG_HOST:$_PG_PORT"
}

# create_db NAME [--drop]: creates database NAME if missing; with --drop it
# is dropped first (WITH (FORCE), disconnecting its sessions).
create_db() {
  local name="${1:?create_db NAME [--drop]}" drop="${2:-}"
  [[ $name =~ ^[a-z_][a-z0-9_]*$ ]] || die "create_db: invalid database name: $name"
  case "$drop" in
    '') ;;
    --drop) psql_admin -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" ;;
    *) die "create_db: unknown option: $drop" ;;
  esac
  if [ "$(psql_admin -At -c "SELECT 1 FROM pg_database WHERE datname = '$name'")" != 1 ]; then
    log "creating database $name"
    psql_admin -c "CREATE DATABASE \"$name\""
  fi
}

# ---------------------------------------------------------------- redis

_redis_ping() {
  [ "$(redis-cli -u "$TOLLGATE_REDIS_URL" ping 2>/dev/null)" = PONG ]
}

# ensure_redis: Redis answering PING at TOLLGATE_REDIS_URL.
ensure_redis() {
  local re='^rediss?://([^@/]*@)?([^:/?]+)(:([0-9]+))?(/.*)?$'
  [[ $TOLLGATE_REDIS_URL =~ $re ]] ||
    die "TOLLGATE_REDIS_URL must look like redis://host:port, got: $TOLLGATE_REDIS_URL"
  local host="${BASH_REMATCH[2]}" port="${BASH_REMATCH[4]:-6379}"
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
  if ! _redis_ping; then
    _is_local_host "$host" || die "Redis at $host:$port is not reachable"
    if ! command -v redis-server >/dev/null 2>&1; then
      apt_install redis-server
    fi
    if ! _redis_ping; then # the package may have started one
      local dir="$TOLLGATE_STATE_DIR/redis"
      mkdir -p "$dir"
      log "starting redis-server on 127.0.0.1:$port (data/log in $(rel "$dir"))"
      redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
        --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log"
      local i
      for ((i = 0; i < 40; i++)); do
        _redis_ping && break
        sleep 0.25
      done
      _redis_ping || die "Redis did not start; see $(rel "$dir")/redis.log"
    fi
  fi
  # Tests of outages and of Redis Cluster start servers of their own.
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  log "Redis ready at $host:$port"
}

# ---------------------------------------------------------------- python

# ensure_venv: .venv with schemathesis 4.x and openai.
ensure_venv() {
  local py="$TOLLGATE_VENV/bin/python"
  if [ -x "$py" ] && ! "$py" -c 'pass' >/dev/null 2>&1; then
    warn "$(rel "$TOLLGATE_VENV") is broken; recreating it"
    rm -rf "$TOLLGATE_VENV"
  fi
  if [ ! -x "$py" ]; then
    log "creating $(rel "$TOLLGATE_VENV")"
    python3 -m venv "$TOLLGATE_VENV"
  fi
  if ! "$py" - <<'EOF' >/dev/null 2>&1; then
import importlib.metadata as md
import sys
try:
    ok = md.version("schemathesis").startswith("4.") and bool(md.version("openai")) and bool(md.version("pytest"))
except md.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
    log "installing schemathesis 4.x, openai and pytest into $(rel "$TOLLGATE_VENV")"
    "$py" -m pip install -q --disable-pip-version-check 'schemathesis==4.*' openai pytest
  fi
}

# ---------------------------------------------------------------- http

# wait_http URL [TIMEOUT_S] [PID]: polls URL until it answers 200. Fails
# after TIMEOUT_S (default 60) or as soon as process PID (optional) exits.
wait_http() {
  local url="${1:?wait_http URL [TIMEOUT_S] [PID]}" timeout="${2:-60}" pid="${3:-}"
  local deadline=$((SECONDS + timeout)) code
  while :; do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true)"
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      printf 'ERROR: process %s exited while waiting for %s\n' "$pid" "$url" >&2
      return 1
    fi
    [ "$code" = 200 ] && return 0
    if ((SECONDS >= deadline)); then
      printf 'ERROR: %s not ready after %ss (last status %s)\n' "$url" "$timeout" "$code" >&2
      return 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------- background processes

# start_bg NAME [VAR=VALUE...] CMD [ARGS...]: runs CMD detached with the given
# extra environment; output to .tollgate/NAME.log, pid to .tollgate/NAME.pid
# (second line: CMD, used to recognise the process later). A previous NAME
# process still alive is stopped first. Sets BG_PID.
start_bg() {
  local name="${1:?start_bg NAME [VAR=VALUE...] CMD [ARGS...]}"
  shift
  local envs=()
  while [ $# -gt 0 ] && [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
    envs+=("$1")
    shift
  done
  [ $# -gt 0 ] || die "start_bg $name: no command"
  mkdir -p "$TOLLGATE_STATE_DIR"
  stop_bg "$name"
  local logf="$TOLLGATE_STATE_DIR/$name.log" pidf="$TOLLGATE_STATE_DIR/$name.pid"
  (
    for kv in "${envs[@]}"; do export "${kv?}"; done
    exec nohup "$@"
  ) >"$logf" 2>&1 </dev/null &
  BG_PID=$!
  printf '%s\n%s\n' "$BG_PID" "$1" >"$pidf"
  log "started $name (pid $BG_PID, log $(rel "$logf"))"
}

# stop_bg NAME: stops the process recorded in .tollgate/NAME.pid if it is
# still the one we started (TERM, then KILL after 10s).
stop_bg() {
  local name="${1:?stop_bg NAME}"
  local pidf="$TOLLGATE_STATE_DIR/$name.pid" pid="" cmd=""
  [ -f "$pidf" ] || return 0
  { read -r pid && read -r cmd; } <"$pidf" || true
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    # The pid may have been reused: CMD must be one of its first arguments
    # (argv0, or argv1 for a script run through an interpreter).
    if [ -n "$cmd" ] && [ -r "/proc/$pid/cmdline" ] &&
      ! tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 2 | grep -qxF -- "$cmd"; then
      warn "pid $pid from $(rel "$pidf") is no longer '$cmd'; leaving it alone"
      rm -f "$pidf"
      return 0
    fi
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 40; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      warn "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidf"
}

# ---------------------------------------------------------------- control API

# control_api_env DB_URL LISTEN ADMIN_KEY: sets the CONTROL_API_ENV array of
# VAR=VALUE settings for the control API (pass to start_bg or env).
control_api_env() {
  CONTROL_API_ENV=(
    "TOLLGATE_DATABASE_URL=$1"
    "TOLLGATE_REDIS_URL=$TOLLGATE_REDIS_URL"
    "TOLLGATE_API_LISTEN=$2"
    "TOLLGATE_ADMIN_API_KEYS=$3"
  )
}

# build_binaries: the three binaries (debug build, shared with the tests).
build_binaries() {
  log "cargo build --bin tollgate-control-api --bin tollgate-gateway --bin tollgate-mock-upstream"
  (cd "$TOLLGATE_ROOT" && cargo build --bin tollgate-control-api --bin tollgate-gateway --bin tollgate-mock-upstream)
}

# start_mock_upstream NAME LISTEN: the OpenAI-compatible stand-in, waited for.
start_mock_upstream() {
  start_bg "$1" "$MOCK_UPSTREAM_BIN" --listen "$2"
  wait_http "$(http_base "$2")/v1/models" 30 "$BG_PID" || die "mock upstream did not start; see .tollgate/$1.log"
}

# start_gateway NAME DATABASE_URL LISTEN ADMIN_LISTEN UPSTREAM_URL [VAR=VALUE...]: the gateway,
# waited for on its admin /ready.
start_gateway() {
  local name="$1" db="$2" listen="$3" admin="$4" upstream="$5"
  shift 5
  start_bg "$name" "TOLLGATE_DATABASE_URL=$db" "TOLLGATE_REDIS_URL=$TOLLGATE_REDIS_URL" \
    "TOLLGATE_LISTEN=$listen" "TOLLGATE_ADMIN_LISTEN=$admin" "TOLLGATE_UPSTREAM_URL=$upstream" \
    "TOLLGATE_UPSTREAM_API_KEY=sk-local-upstream" "TOLLGATE_SPOOL_DIR=$TOLLGATE_STATE_DIR/$name-spool" \
    "TOLLGATE_GRACE_PERIOD_SECONDS=1" "TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS=5" "$@" "$GATEWAY_BIN"
  wait_http "$(http_base "$admin")/ready" 60 "$BG_PID" || {
    tail -n 30 "$TOLLGATE_STATE_DIR/$name.log" >&2 || true
    die "gateway did not become ready; see .tollgate/$name.log"
  }
}

build_control_api() {
  log "cargo build --bin tollgate-control-api"
  (cd "$TOLLGATE_ROOT" && cargo build --bin tollgate-control-api)
}

# migrate_control_api: applies migrations using CONTROL_API_ENV.
migrate_control_api() {
  log "$(rel "$CONTROL_API_BIN") migrate"
  env "${CONTROL_API_ENV[@]}" "$CONTROL_API_BIN" migrate
}

# port_in_use HOST:PORT: true if something accepts connections there.
port_in_use() {
  python3 -c '
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
host = host.strip("[]")
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"
try:
    socket.create_connection((host, int(port)), timeout=1).close()
except OSError:
    sys.exit(1)
' "$1"
}

# start_control_api NAME: starts the control API (CONTROL_API_ENV) in the
# background as NAME, after stopping a previous NAME; sets BG_PID. Fails if
# something else already listens on its address.
start_control_api() {
  local kv listen=""
  for kv in "${CONTROL_API_ENV[@]}"; do
    case "$kv" in TOLLGATE_API_LISTEN=*) listen="${kv#*=}" ;; esac
  done
  stop_bg "$1"
  if [ -n "$listen" ] && port_in_use "$listen"; then
    die "$listen is already in use by another process (set TOLLGATE_API_LISTEN or stop it)"
  fi
  start_bg "$1" "${CONTROL_API_ENV[@]}" "$CONTROL_API_BIN"
}

# http_base LISTEN: http://host:port URL for a listen address.
http_base() {
  local listen="$1" host port
  host="${listen%:*}"
  port="${listen##*:}"
  case "$host" in '' | 0.0.0.0 | '[::]') host=127.0.0.1 ;; esac
  printf 'http://%s:%s\n' "$host" "$port"
}
