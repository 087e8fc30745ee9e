# shellcheck shell=bash
# Redis: reused when it already answers, installed and started (daemonized,
# data in .tollgate/redis) when it is local and does not.
#
# Provides: TOLLGATE_REDIS_URL, ensure_redis. Needs: lib/log.sh, lib/apt.sh,
# lib/proc.sh (is_local_host), TOLLGATE_STATE_DIR.

TOLLGATE_REDIS_URL="${TOLLGATE_REDIS_URL:-redis://127.0.0.1:6379}" # a pre-set value wins
export TOLLGATE_REDIS_URL

_redis_ping() {
  [ "$(redis-cli -u "$TOLLGATE_REDIS_URL" ping 2>/dev/null)" = PONG ]
}

# ensure_redis: Redis answering PING at TOLLGATE_REDIS_URL, and redis-server
# installed (tests of outages and of Redis Cluster start servers of their own).
ensure_redis() {
  local re='^rediss?://([^@/]*@)?([^:/?]+)(:([0-9]+))?(/.*)?$'
  [[ $TOLLGATE_REDIS_URL =~ $re ]] ||
    die "TOLLGATE_REDIS_URL must look like redis://host:port, got: $TOLLGATE_REDIS_URL"
  local host="${BASH_REMATCH[2]}" port="${BASH_REMATCH[4]:-6379}"
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
  if ! _redis_ping; then
    is_local_host "$host" || die "Redis at $host:$port is not reachable"
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
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  log "Redis ready at $host:$port"
}
