# shellcheck shell=bash
# Background processes, HTTP readiness and ports.
#
# Provides: start_bg, stop_bg, bg_pid, wait_http, free_port, port_in_use,
# http_base, is_local_host. Needs: lib/log.sh, TOLLGATE_STATE_DIR.
#
# A background process NAME has its output in .tollgate/NAME.log and its pid
# in .tollgate/NAME.pid (second line: the command, used to recognise the
# process later), so that another shell (scripts/down) can stop it.

# start_bg NAME [VAR=VALUE...] CMD [ARGS...]: runs CMD detached with the given
# extra environment, after stopping a previous NAME process still alive.
# Prints nothing on stdout: call it directly, not in $(...), so the process
# stays a child of the calling shell; `bg_pid NAME` then prints its pid.
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
  local logf="$TOLLGATE_STATE_DIR/$name.log" pidf="$TOLLGATE_STATE_DIR/$name.pid" pid
  (
    for kv in "${envs[@]}"; do export "${kv?}"; done
    exec nohup "$@"
  ) >"$logf" 2>&1 </dev/null &
  pid=$!
  printf '%s\n%s\n' "$pid" "$1" >"$pidf"
  log "started $name (pid $pid, log $(rel "$logf"))"
}

# bg_pid NAME: prints the pid recorded for NAME (nothing if there is none).
bg_pid() {
  local pidf="$TOLLGATE_STATE_DIR/${1:?bg_pid NAME}.pid" pid=""
  if [ -f "$pidf" ]; then
    read -r pid <"$pidf" || true
  fi
  printf '%s\n' "$pid"
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

# free_port [N]: N (default 1) distinct TCP ports currently free on
# 127.0.0.1, one a line.
free_port() {
  python3 - "${1:-1}" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)  # held open until all are picked, so no port comes twice
for s in socks:
    print(s.getsockname()[1])
    s.close()
PY
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

# http_base LISTEN: the http://host:port URL of a listen address.
http_base() {
  local listen="$1" host port
  host="${listen%:*}"
  port="${listen##*:}"
  case "$host" in '' | 0.0.0.0 | '[::]') host=127.0.0.1 ;; esac
  printf 'http://%s:%s\n' "$host" "$port"
}

# is_local_host HOST: true for a loopback name or address.
is_local_host() {
  case "$1" in
    127.0.0.1 | localhost | ::1 | '[::1]') return 0 ;;
    *) return 1 ;;
  esac
}
