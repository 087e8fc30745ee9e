# shellcheck shell=bash
# PostgreSQL: reused when it already runs, installed and started on a fresh
# Debian machine when it is local; databases for the stacks and tests.
#
# Provides: TOLLGATE_PG_BASE, ensure_postgres, pg_parse, psql_admin,
# create_db. Needs: lib/log.sh, lib/apt.sh, lib/proc.sh (is_local_host).

# Connection settings; a pre-set value wins. TOLLGATE_PG_BASE has no database
# name: append "/<db>". The password is ignored by trust auth and is set on a
# freshly installed local PostgreSQL (see ensure_postgres).
TOLLGATE_PG_BASE="${TOLLGATE_PG_BASE:-postgres://postgres:postgres@127.0.0.1:5432}"
TOLLGATE_PG_BASE="${TOLLGATE_PG_BASE%/}"
export TOLLGATE_PG_BASE

# pg_parse URL: the parts of a server URL such as TOLLGATE_PG_BASE, one a
# line: user, password (may be empty), host, port. Dies on a malformed URL.
pg_parse() {
  local url="${1?pg_parse URL}"
  local re='^postgres(ql)?://(([^:@/]*)(:([^@/]*))?@)?([^:/?]+)(:([0-9]+))?$'
  [[ $url =~ $re ]] ||
    die "TOLLGATE_PG_BASE must look like postgres://user:pass@host:port (no database), got: $url"
  printf '%s\n' "${BASH_REMATCH[3]:-postgres}" "${BASH_REMATCH[5]}" "${BASH_REMATCH[6]}" "${BASH_REMATCH[8]:-5432}"
}

# _pg_ready HOST PORT
_pg_ready() { pg_isready -q -h "$1" -p "$2" >/dev/null 2>&1; }

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

# _pg_start_local HOST PORT: installs (if needed) and starts a local cluster
# listening on PORT.
_pg_start_local() {
  local host="$1" port="$2"
  if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    apt_install postgresql postgresql-client
    _pg_ready "$host" "$port" && return 0 # the package may have started its cluster
  fi
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not running on $host:$port; start it (needs root)"
  local ver cluster
  ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
  cluster="$(pg_lsclusters --no-header 2>/dev/null | awk -v p="$port" '$3 == p { print $1 " " $2; exit }')"
  if [ -z "$cluster" ]; then
    local name=main
    if pg_lsclusters --no-header 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" { f = 1 } END { exit !f }'; then
      name=tollgate
    fi
    log "creating PostgreSQL cluster $ver/$name on port $port"
    pg_createcluster --port "$port" "$ver" "$name"
    cluster="$ver $name"
  fi
  log "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086 # "$ver $name" is split on purpose
  pg_ctlcluster --skip-systemctl-redirect $cluster start
  local i
  for ((i = 0; i < 60; i++)); do
    _pg_ready "$host" "$port" && return 0
    sleep 0.5
  done
  die "PostgreSQL did not become ready on $host:$port"
}

# ensure_postgres: PostgreSQL reachable with TOLLGATE_PG_BASE.
ensure_postgres() {
  local out pg user pass host port
  out="$(pg_parse "$TOLLGATE_PG_BASE")"
  mapfile -t pg <<<"$out"
  user="${pg[0]}" pass="${pg[1]}" host="${pg[2]}" port="${pg[3]}"
  if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
    if is_local_host "$host" && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
      apt_install postgresql postgresql-client
    else
      apt_install postgresql-client
    fi
  fi
  if ! _pg_ready "$host" "$port"; then
    is_local_host "$host" || die "PostgreSQL at $host:$port is not reachable"
    _pg_start_local "$host" "$port"
  fi
  if ! _pg_login_ok; then
    # Fresh Debian install: peer/scram auth and no password yet. Give the
    # role the password from the URL through the local socket.
    if is_local_host "$host" && [ "$(id -u)" -eq 0 ] && [ -n "$pass" ] &&
      id postgres >/dev/null 2>&1; then
      log "setting the password of PostgreSQL role '$user'"
      _as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" \
        -c "ALTER ROLE \"${user//\"/\"\"}\" WITH LOGIN PASSWORD '${pass//\'/\'\'}'" ||
        warn "could not set the password of role '$user'"
    fi
    _pg_login_ok || die "cannot log in to PostgreSQL with $TOLLGATE_PG_BASE/postgres (check pg_hba.conf / password)"
  fi
  log "PostgreSQL ready at $host:$port"
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
