# shellcheck shell=bash
# The one entry to the helpers the Tollgate dev/test scripts share. Source it,
# don't run it:
#
#   cd "$(dirname "$0")/.." && source scripts/services.sh
#
# It turns on strict mode, sets the paths below and sources scripts/lib/, one
# file per concern (each file's header lists what it provides and needs):
#
#   lib/log.sh       messages: log, warn, die, rel
#   lib/apt.sh       Debian packages: apt_install, ensure_tools
#   lib/proc.sh      background processes and ports: start_bg, stop_bg, bg_pid,
#                    wait_http, free_port, port_in_use, http_base, is_local_host
#   lib/postgres.sh  TOLLGATE_PG_BASE; ensure_postgres, pg_parse, psql_admin, create_db
#   lib/redis.sh     TOLLGATE_REDIS_URL; ensure_redis
#   lib/python.sh    TOLLGATE_VENV; ensure_venv
#   lib/stack.sh     the binaries and local stacks: build_binaries, stack_up,
#                    stack_down, control_api_env, migrate_control_api,
#                    new_admin_key, random_hex
#
# PostgreSQL/Redis that already run are reused and never stopped; on a fresh
# Debian machine they are installed and started.
#
# Conventions:
# - A function that computes a value prints it on stdout: `x="$(fn ...)"`.
#   Messages go to stderr (lib/log.sh), so they never mix with values.
# - A list (e.g. VAR=VALUE settings, ports) is printed one item a line (items
#   hold no newline; a list is never empty) and read into an array in two
#   steps, so that a failure of the function still stops the caller (set -e
#   does not see one inside `< <(fn)`):
#       local out arr
#       out="$(fn ...)"
#       mapfile -t arr <<<"$out"
# - Functions that start background processes (start_bg, stack_up) must run in
#   the calling shell, not in $(...), so their processes stay its children:
#   start_bg records the pid (read it with `bg_pid NAME`); stack_up exports
#   STACK_* variables (see lib/stack.sh).
# - Functions rely on set -e to stop at a failing command: don't call one as
#   `fn || ...` or `if fn` unless it returns its status explicitly (as
#   wait_http, port_in_use and is_local_host do): bash ignores set -e there.

set -euo pipefail

TOLLGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOLLGATE_STATE_DIR="$TOLLGATE_ROOT/.tollgate" # gitignored: pids, logs, keys

# shellcheck source=scripts/lib/log.sh
source "$TOLLGATE_ROOT/scripts/lib/log.sh"
# shellcheck source=scripts/lib/apt.sh
source "$TOLLGATE_ROOT/scripts/lib/apt.sh"
# shellcheck source=scripts/lib/proc.sh
source "$TOLLGATE_ROOT/scripts/lib/proc.sh"
# shellcheck source=scripts/lib/postgres.sh
source "$TOLLGATE_ROOT/scripts/lib/postgres.sh"
# shellcheck source=scripts/lib/redis.sh
source "$TOLLGATE_ROOT/scripts/lib/redis.sh"
# shellcheck source=scripts/lib/python.sh
source "$TOLLGATE_ROOT/scripts/lib/python.sh"
# shellcheck source=scripts/lib/stack.sh
source "$TOLLGATE_ROOT/scripts/lib/stack.sh"
