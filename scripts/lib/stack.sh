# shellcheck shell=bash
# The Tollgate binaries and local stacks: the one place that starts a control
# API, a mock upstream and a gateway (scripts/up, scripts/test's schemathesis
# and sdk stages, bench/run).
#
# Provides: random_hex, new_admin_key, tollgate_bin_dir, build_binaries, ensure_cargo,
# control_api_env, migrate_control_api, stack_up, stack_down.
# Needs: lib/log.sh, lib/proc.sh, lib/postgres.sh (create_db,
# TOLLGATE_PG_BASE), lib/redis.sh (TOLLGATE_REDIS_URL), TOLLGATE_ROOT,
# TOLLGATE_STATE_DIR. stack_up expects ensure_postgres and ensure_redis to
# have run.

# random_hex NBYTES: 2*NBYTES lowercase hex characters.
random_hex() {
  od -An -tx1 -N"${1:-16}" /dev/urandom | tr -d ' \n'
  echo
}

# new_admin_key: a fresh admin API key for the control API.
new_admin_key() { printf 'sk-tg-admin-%s\n' "$(random_hex 16)"; }

# tollgate_bin_dir [--release]: the directory cargo builds the binaries into.
tollgate_bin_dir() {
  local profile=debug
  if [ "${1:-}" = --release ]; then profile=release; fi
  printf '%s\n' "${CARGO_TARGET_DIR:-$TOLLGATE_ROOT/target}/$profile"
}

# build_binaries [--release] [PART...]: cargo build of the parts' binaries
# (PART: control-api, gateway, mock-upstream; default all three).
build_binaries() {
  local release=() part bins=()
  if [ "${1:-}" = --release ]; then
    release=(--release)
    shift
  fi
  [ $# -gt 0 ] || set -- control-api gateway mock-upstream
  for part in "$@"; do
    case "$part" in
      control-api | gateway | mock-upstream) bins+=(--bin "tollgate-$part") ;;
      *) die "build_binaries: unknown part: $part" ;;
    esac
  done
  ensure_cargo
  if [ "${TOLLGATE_VERBOSE:-0}" = 1 ]; then
    log "cargo build ${release[*]}${release[*]:+ }${bins[*]}"
    (cd "$TOLLGATE_ROOT" && cargo build "${release[@]}" "${bins[@]}")
    return
  fi
  # Quiet: a progress line, the whole output in a log (a first build compiles
  # ~370 crates, about 4 minutes on 2 cores).
  local logf="$TOLLGATE_STATE_DIR/build.log"
  mkdir -p "$TOLLGATE_STATE_DIR"
  log "cargo build ${release[*]}${release[*]:+ }${bins[*]}  (output: $(rel "$logf"); TOLLGATE_VERBOSE=1 shows it)"
  if ! (cd "$TOLLGATE_ROOT" && cargo build "${release[@]}" "${bins[@]}" 2>&1) | _build_progress "$logf"; then
    tail -n 40 "$logf" >&2 || true
    die "cargo build failed; the whole output is in $(rel "$logf")"
  fi
}

# _build_progress LOG: copies cargo's output on stdin to LOG and counts the
# crates it compiles: one line rewritten in place on a terminal, a line per 50
# crates otherwise.
_build_progress() {
  local line n=0 tty=0
  if [ -t 2 ]; then tty=1; fi
  : >"$1"
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$1"
    case "$line" in
      *Compiling*)
        n=$((n + 1))
        if [ "$tty" = 1 ]; then
          printf '\r    compiled %d crates' "$n" >&2
        elif [ $((n % 50)) = 0 ]; then
          printf '    compiled %d crates\n' "$n" >&2
        fi
        ;;
    esac
  done
  if [ "$tty" = 1 ] && [ "$n" -gt 0 ]; then printf '\n' >&2; fi
}

# ensure_cargo: dies with what to install when there is no Rust toolchain.
ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: Tollgate needs a Rust toolchain, $(_rust_version) or newer (https://rustup.rs: curl --proto '=https' -sSf https://sh.rustup.rs | sh)"
}

# _rust_version: the workspace's rust-version (the oldest Rust it builds with).
_rust_version() {
  sed -n 's/^rust-version *= *"\(.*\)"/Rust \1/p' "$TOLLGATE_ROOT/Cargo.toml"
}

# control_api_env DB_URL LISTEN ADMIN_KEY: the control API's settings, one
# VAR=VALUE a line (a list: read it as scripts/services.sh describes).
control_api_env() {
  printf '%s\n' \
    "TOLLGATE_DATABASE_URL=${1:?control_api_env DB_URL LISTEN ADMIN_KEY}" \
    "TOLLGATE_REDIS_URL=$TOLLGATE_REDIS_URL" \
    "TOLLGATE_API_LISTEN=${2:?}" \
    "TOLLGATE_ADMIN_API_KEYS=${3:?}"
}

# migrate_control_api BIN [VAR=VALUE...]: applies the migrations with the
# control API binary BIN and the given settings.
migrate_control_api() {
  local bin="${1:?migrate_control_api BIN [VAR=VALUE...]}"
  shift
  log "$(rel "$bin") migrate"
  env "$@" "$bin" migrate
}

# _stack_name PREFIX PART: the process name of a stack part.
_stack_name() { printf '%s\n' "${1:+$1-}$2"; }

# _stack_start NAME LISTEN READY_URL TIMEOUT_S [VAR=VALUE...] CMD [ARGS...]:
# start_bg after checking that nothing else listens on LISTEN, then waits for
# READY_URL; on failure shows the end of the log and dies.
_stack_start() {
  local name="$1" listen="$2" ready="$3" timeout="$4"
  shift 4
  stop_bg "$name"
  if port_in_use "$listen"; then
    die "$listen (for $name) is already in use by another process; stop it or choose another address"
  fi
  start_bg "$name" "$@"
  if ! wait_http "$ready" "$timeout" "$(bg_pid "$name")"; then
    tail -n 30 "$TOLLGATE_STATE_DIR/$name.log" >&2 || true
    die "$name did not become ready; see $(rel "$TOLLGATE_STATE_DIR")/$name.log"
  fi
}

# stack_up PREFIX DB [OPTION...]: a local Tollgate stack in the background.
# Builds the binaries, creates database DB if missing and migrates it, starts
# the parts asked for, each on the address given or else on a free 127.0.0.1
# port, and returns once each answers (control API /ready, mock upstream
# /v1/models, gateway admin /ready). Dies if a part does not come up.
#
#   PREFIX  process names are PREFIX-control-api, PREFIX-mock-upstream and
#           PREFIX-gateway (with PREFIX "": control-api, ...); each has its
#           log and pid in .tollgate/ (see lib/proc.sh). A part of the same
#           name still running is stopped first.
#   DB      database name, on TOLLGATE_PG_BASE.
# Options:
#   --parts LIST         comma-separated subset of control-api,mock-upstream,
#                        gateway (default: all three); DB is migrated anyway
#   --fresh              drop DB first
#   --admin-key KEY      the control API's admin API key (default: a new one)
#   --api-listen ADDR    control API address     } default: a free port
#   --mock-listen ADDR   mock upstream address   } on 127.0.0.1
#   --listen ADDR        gateway address         }
#   --admin-listen ADDR  gateway admin address (/ready, /metrics)
#   --upstream URL       the gateway's upstream; the mock is then not started
#   --api-env VAR=VALUE  an extra control API setting (repeatable; also
#                        applies to the migration)
#   --gateway-env VAR=VALUE  an extra gateway setting (repeatable)
#   --before-gateway FN  calls function FN once the control API and the
#                        upstream answer, before the gateway starts (to seed
#                        data; the STACK_* variables are set by then)
#   --release            target/release binaries (default: target/debug)
#   --no-build           no cargo build (the binaries are already built)
#
# It starts background processes, so it runs in the calling shell and returns
# its results in exported variables rather than on stdout:
#   STACK_DATABASE_URL  postgres://.../DB
#   STACK_ADMIN_KEY     the control API's admin API key
#   STACK_API_URL       http://host:port of the control API
#   STACK_UPSTREAM_URL  http://host:port of the gateway's upstream (the mock,
#                       or --upstream)
#   STACK_GATEWAY_URL   http://host:port of the gateway
#   STACK_GATEWAY_ADMIN_URL  http://host:port of the gateway's admin listener
# (empty for a part not started). Stop it with `stack_down PREFIX`.
stack_up() {
  local usage='stack_up PREFIX DB [OPTION...]'
  local prefix="${1?$usage}" db="${2:?$usage}"
  shift 2
  local parts=control-api,mock-upstream,gateway fresh=0 admin_key="" upstream="" before_gateway=""
  local api_listen="" mock_listen="" listen="" admin_listen="" release=() build=1 extra_api=() extra_gw=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --parts | --admin-key | --api-listen | --mock-listen | --listen | --admin-listen | --upstream | \
        --api-env | --gateway-env | --before-gateway)
        [ $# -ge 2 ] || die "stack_up: $1 needs a value"
        case "$1" in
          --parts) parts="$2" ;;
          --admin-key) admin_key="$2" ;;
          --api-listen) api_listen="$2" ;;
          --mock-listen) mock_listen="$2" ;;
          --listen) listen="$2" ;;
          --admin-listen) admin_listen="$2" ;;
          --upstream) upstream="$2" ;;
          --api-env) extra_api+=("$2") ;;
          --gateway-env) extra_gw+=("$2") ;;
          --before-gateway) before_gateway="$2" ;;
        esac
        shift
        ;;
      --fresh) fresh=1 ;;
      --release) release=(--release) ;;
      --no-build) build=0 ;;
      *) die "stack_up: unknown option: $1" ;;
    esac
    shift
  done

  local part list want_api=0 want_mock=0 want_gw=0
  IFS=, read -ra list <<<"$parts"
  for part in "${list[@]}"; do
    case "$part" in
      control-api) want_api=1 ;;
      mock-upstream) want_mock=1 ;;
      gateway) want_gw=1 ;;
      *) die "stack_up: unknown part: $part (known: control-api, mock-upstream, gateway)" ;;
    esac
  done
  if [ -n "$upstream" ]; then want_mock=0; fi
  if [ "$want_gw" = 1 ] && [ "$want_mock" = 0 ] && [ -z "$upstream" ]; then
    die "stack_up: the gateway needs an upstream: add mock-upstream to --parts or pass --upstream URL"
  fi

  if [ "$build" = 1 ]; then
    local bins=(control-api) # always: it migrates the database
    if [ "$want_gw" = 1 ]; then bins+=(gateway); fi
    if [ "$want_mock" = 1 ]; then bins+=(mock-upstream); fi
    build_binaries "${release[@]}" "${bins[@]}"
  fi
  local bin_dir
  bin_dir="$(tollgate_bin_dir "${release[@]}")"

  local out ports
  out="$(free_port 4)"
  mapfile -t ports <<<"$out"
  api_listen="${api_listen:-127.0.0.1:${ports[0]}}"
  mock_listen="${mock_listen:-127.0.0.1:${ports[1]}}"
  listen="${listen:-127.0.0.1:${ports[2]}}"
  admin_listen="${admin_listen:-127.0.0.1:${ports[3]}}"
  if [ -z "$admin_key" ]; then admin_key="$(new_admin_key)"; fi

  STACK_DATABASE_URL="$TOLLGATE_PG_BASE/$db"
  STACK_ADMIN_KEY="$admin_key"
  STACK_API_URL="" STACK_UPSTREAM_URL="$upstream" STACK_GATEWAY_URL="" STACK_GATEWAY_ADMIN_URL=""
  if [ "$want_api" = 1 ]; then STACK_API_URL="$(http_base "$api_listen")"; fi
  if [ "$want_mock" = 1 ]; then STACK_UPSTREAM_URL="$(http_base "$mock_listen")"; fi
  if [ "$want_gw" = 1 ]; then
    STACK_GATEWAY_URL="$(http_base "$listen")"
    STACK_GATEWAY_ADMIN_URL="$(http_base "$admin_listen")"
  fi
  export STACK_DATABASE_URL STACK_ADMIN_KEY STACK_API_URL STACK_UPSTREAM_URL STACK_GATEWAY_URL STACK_GATEWAY_ADMIN_URL

  if [ "$fresh" = 1 ]; then
    create_db "$db" --drop
  else
    create_db "$db"
  fi
  local api_env
  out="$(control_api_env "$STACK_DATABASE_URL" "$api_listen" "$admin_key")"
  mapfile -t api_env <<<"$out"
  api_env+=("${extra_api[@]}")
  migrate_control_api "$bin_dir/tollgate-control-api" "${api_env[@]}"

  if [ "$want_api" = 1 ]; then
    _stack_start "$(_stack_name "$prefix" control-api)" "$api_listen" "$STACK_API_URL/ready" 60 \
      "${api_env[@]}" "$bin_dir/tollgate-control-api"
    log "control API ready at $STACK_API_URL"
  fi

  if [ -n "$upstream" ]; then
    log "using the upstream at $upstream"
  elif [ "$want_mock" = 1 ]; then
    _stack_start "$(_stack_name "$prefix" mock-upstream)" "$mock_listen" "$STACK_UPSTREAM_URL/v1/models" 30 \
      "$bin_dir/tollgate-mock-upstream" --listen "$mock_listen"
    log "mock upstream ready at $STACK_UPSTREAM_URL"
  fi

  if [ -n "$before_gateway" ]; then "$before_gateway"; fi

  if [ "$want_gw" = 1 ]; then
    local name
    name="$(_stack_name "$prefix" gateway)"
    _stack_start "$name" "$listen" "$STACK_GATEWAY_ADMIN_URL/ready" 60 \
      "TOLLGATE_DATABASE_URL=$STACK_DATABASE_URL" "TOLLGATE_REDIS_URL=$TOLLGATE_REDIS_URL" \
      "TOLLGATE_LISTEN=$listen" "TOLLGATE_ADMIN_LISTEN=$admin_listen" "TOLLGATE_UPSTREAM_URL=$STACK_UPSTREAM_URL" \
      "TOLLGATE_UPSTREAM_API_KEY=sk-local-upstream" "TOLLGATE_SPOOL_DIR=$TOLLGATE_STATE_DIR/$name-spool" \
      "TOLLGATE_GRACE_PERIOD_SECONDS=1" "TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS=5" "${extra_gw[@]}" \
      "$bin_dir/tollgate-gateway"
    log "gateway ready at $STACK_GATEWAY_URL (metrics at $STACK_GATEWAY_ADMIN_URL/metrics)"
  fi
}

# stack_down PREFIX: stops the parts stack_up PREFIX started (gateway first).
stack_down() {
  local prefix="${1?stack_down PREFIX}" part
  for part in gateway mock-upstream control-api; do
    stop_bg "$(_stack_name "$prefix" "$part")"
  done
}
