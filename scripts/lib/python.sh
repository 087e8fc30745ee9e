# shellcheck shell=bash
# The Python tooling of the tests: a venv in .venv/ (gitignored).
#
# Provides: TOLLGATE_VENV, ensure_venv. Needs: lib/log.sh, TOLLGATE_ROOT.

TOLLGATE_VENV="$TOLLGATE_ROOT/.venv"

# ensure_venv: .venv with schemathesis 4.x, openai and pytest.
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
  if ! "$py" - <<'PY' >/dev/null 2>&1; then
import importlib.metadata as md
import sys
try:
    ok = md.version("schemathesis").startswith("4.") and bool(md.version("openai")) and bool(md.version("pytest"))
except md.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
    log "installing schemathesis 4.x, openai and pytest into $(rel "$TOLLGATE_VENV")"
    "$py" -m pip install -q --disable-pip-version-check 'schemathesis==4.*' openai pytest
  fi
}
