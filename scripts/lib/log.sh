# shellcheck shell=bash
# Messages. Everything a script says goes to stderr, so that stdout stays free
# for the values functions return (see scripts/services.sh).
#
# Provides: log, warn, die, rel. Needs: TOLLGATE_ROOT.

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
  printf 'ERROR: %s\n' "$*" >&2
  exit 1
}

# rel PATH: PATH relative to the repo root, for messages.
rel() { printf '%s\n' "${1#"$TOLLGATE_ROOT"/}"; }
