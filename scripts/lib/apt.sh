# shellcheck shell=bash
# Debian packages: installing what is missing, and the build/script
# prerequisites every script needs.
#
# Provides: apt_install, ensure_tools. Needs: lib/log.sh.

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

# ensure_tools: build/script prerequisites, each installed only if missing.
ensure_tools() {
  local pkgs=()
  command -v cmake >/dev/null 2>&1 || pkgs+=(cmake) # pingora's build
  command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
  # pingora's TLS (openssl feature): the headers and libssl to link against.
  [ -e /usr/include/openssl/ssl.h ] || pkgs+=(libssl-dev)
  command -v openssl >/dev/null 2>&1 || pkgs+=(openssl) # test certificates
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
