# shellcheck shell=bash
# The container image's test (the Containerfile at the repository's root): the `image` stage of
# scripts/test, also run alone by scripts/image.
#
# Provides: stage_image, ensure_podman, tg_podman, tg_podman_timeout, image_base, image_build, image_tag.
# Needs: lib/log.sh, lib/apt.sh, lib/proc.sh, lib/postgres.sh (create_db, TOLLGATE_PG_BASE),
# lib/redis.sh (TOLLGATE_REDIS_URL), lib/stack.sh (build_binaries, tollgate_bin_dir,
# new_admin_key), TOLLGATE_ROOT, TOLLGATE_STATE_DIR; stage_skip (scripts/test) or a function of
# that name. stage_image expects ensure_postgres and ensure_redis to have run.
#
# No container registry is reachable here (only Debian's mirror and the language registries), so
# stage_image builds the Containerfile with two substitutions (see its header):
#   - RUNTIME_IMAGE (debian:bookworm-slim) -> localhost/base:<codename>, a Debian base made with
#     debootstrap --variant=minbase from the mirror in /etc/apt/sources.list*, trimmed, imported,
#     and cached with `podman save` in .tools/image/ (gitignored; delete it to refresh the base);
#   - the `build` stage (Rust image, cargo build --release) -> `--build-context build=DIR`, DIR/out/
#     holding the host's debug binaries (build_binaries), debug info stripped.
# Everything else is the Containerfile as written: the runtime-base stage's apt-get (against
# Debian's mirror, with the build on the host network), the user, the spool directory, labels,
# ENV, and the default target. Then, like the chart's pods (non-root, read-only root filesystem,
# the spool on a volume, /tmp a tmpfs), on the host network bound to 127.0.0.1 only:
#   1. `tollgate-control-api migrate` in a container (the chart's migrations Job) on a fresh
#      database tollgate_image;
#   2. the control API (`tollgate-control-api serve`) and the gateway (the image's default
#      command) in containers with migrations off, the gateway's upstream the mock upstream run on
#      the host from target/debug;
#   3. a model, a user, a subscription and a key made through the containerized control API, a
#      chat completion through the containerized gateway (200, the mock's answer), its usage row
#      read back through the control API;
#   4. every process of both containers runs as uid 10001, the image's labels and ENV are set,
#      the chart's defaults name this image, its user, binaries and spool path,
#      the mock-upstream test image answers /v1/models, and the build context the real build sees
#      (.containerignore) holds the sources and not target/, .git, .tools, .tollgate.
# Containers and the volume are removed on exit; logs in .tollgate/image-*.log.
# podman, runc, catatonit (podman run --init) and debootstrap are installed with apt when
# missing; the stage is SKIP only if they cannot be installed or podman cannot run at all here.
# podman runs with CONTAINERS_CONF=$TOLLGATE_PODMAN_DIR/containers.conf (the open-files and
# process limits this kind of VM allows, runc instead of crun) and the fixed --root/--runroot
# below; TOLLGATE_PODMAN_DIR defaults to /var/tmp/tollgate-podman.

TOLLGATE_PODMAN_DIR="${TOLLGATE_PODMAN_DIR:-/var/tmp/tollgate-podman}"
IMAGE_TOOLS_DIR="$TOLLGATE_ROOT/.tools/image" # gitignored
IMAGE_REPOSITORY="localhost/tollgate"         # the chart's image.repository is `tollgate`
IMAGE_MOCK_REPOSITORY="localhost/tollgate-mock-upstream"
IMAGE_UID=10001 # the Containerfile's USER and the chart's runAsUser

# tg_podman ARGS...: podman with the project's containers.conf and storage paths.
tg_podman() { tg_podman_timeout 0 "$@"; }

# tg_podman_timeout SECONDS ARGS...: tg_podman, killed after SECONDS (0: never).
tg_podman_timeout() {
  local t="${1:?tg_podman_timeout SECONDS ARGS...}"
  shift
  CONTAINERS_CONF="$TOLLGATE_PODMAN_DIR/containers.conf" \
    timeout "$t" podman --root "$TOLLGATE_PODMAN_DIR/root" --runroot "$TOLLGATE_PODMAN_DIR/runroot" "$@"
}

# ensure_podman: podman, runc, catatonit and debootstrap installed, the containers.conf written,
# and podman able to run here. Returns its status explicitly (called as `if`).
ensure_podman() {
  local pkgs=()
  command -v podman >/dev/null 2>&1 || pkgs+=(podman)
  command -v runc >/dev/null 2>&1 || pkgs+=(runc)
  [ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || pkgs+=(catatonit)
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    (apt_install "${pkgs[@]}") || return 1 # a subshell: apt_install dies when it cannot install
  fi
  case "$TOLLGATE_PODMAN_DIR" in
    /*) ;;
    *) die "TOLLGATE_PODMAN_DIR must be an absolute path (podman's --root and --runroot), got: $TOLLGATE_PODMAN_DIR" ;;
  esac
  mkdir -p "$TOLLGATE_PODMAN_DIR" || return 1
  # This kind of VM: hard open-files limit 20000, no CAP_SYS_RESOURCE to raise it, and hybrid
  # cgroups that crun rejects.
  cat >"$TOLLGATE_PODMAN_DIR/containers.conf" <<'EOF' || return 1
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
  local out
  if ! out="$(timeout 60 podman --version 2>&1 && tg_podman_timeout 120 info --format '{{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}' 2>&1)"; then
    printf '%s\n' "$out" | tail -n 5 >&2
    return 1
  fi
  log "$(printf '%s' "$out" | tr '\n' ' ')(storage driver, runtime)"
}

# image_tag: the image's tag, the chart's appVersion, which must equal the workspace version.
image_tag() {
  local app version
  app="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$TOLLGATE_ROOT/charts/tollgate/Chart.yaml")"
  version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$TOLLGATE_ROOT/Cargo.toml")"
  [ -n "$app" ] || die "no appVersion in charts/tollgate/Chart.yaml"
  [ "$app" = "$version" ] ||
    die "charts/tollgate/Chart.yaml appVersion ($app) differs from the workspace version in Cargo.toml ($version)"
  printf '%s\n' "$app"
}

# _image_codename: the host's Debian release (the base must match the libraries the host's
# binaries were linked against).
_image_codename() {
  local codename=""
  if [ -r /etc/os-release ]; then
    codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"')"
  fi
  printf '%s\n' "${codename:-bookworm}"
}

# _image_mirror CODENAME: the Debian mirror apt uses for CODENAME (one-line sources.list entries
# or deb822 .sources), else deb.debian.org.
_image_mirror() {
  python3 - "$1" /etc/apt/sources.list /etc/apt/sources.list.d/* <<'PY'
import pathlib, sys
codename, files = sys.argv[1], sys.argv[2:]
found = []
for f in files:
    p = pathlib.Path(f)
    if not p.is_file():
        continue
    text = p.read_text(errors="replace")
    if f.endswith(".sources"):
        for stanza in text.split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if line.strip().startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
            if "deb" in fields.get("types", []) and codename in fields.get("suites", []) \
                    and fields.get("enabled", ["yes"])[0].lower() != "no":
                found += fields.get("uris", [])
    elif f.endswith(".list"):
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2 and words[1] == codename:
                found.append(words[0])
urls = [u for u in found if u.startswith(("http://", "https://"))]
print((urls or ["http://deb.debian.org/debian"])[0].rstrip("/"))
PY
}

# image_base: prints the local base image's name, localhost/base:<codename>: already in podman's
# store, else loaded from .tools/image/, else made with debootstrap and saved there.
image_base() {
  local codename name archive
  codename="$(_image_codename)"
  name="localhost/base:$codename"
  archive="$IMAGE_TOOLS_DIR/base-$codename.tar"
  if tg_podman image exists "$name"; then
    log "base image $name (in podman's store)"
    printf '%s\n' "$name"
    return 0
  fi
  if [ -s "$archive" ]; then
    log "podman load -i $(rel "$archive")"
    if tg_podman_timeout 300 load -q -i "$archive" >&2 && tg_podman image exists "$name"; then
      printf '%s\n' "$name"
      return 0
    fi
    warn "could not load $(rel "$archive"); making the base again"
    rm -f "$archive"
  fi
  local mirror rootfs="$TOLLGATE_PODMAN_DIR/rootfs-$codename" logf="$TOLLGATE_STATE_DIR/image-debootstrap.log"
  mirror="$(_image_mirror "$codename")"
  rm -rf "$rootfs"
  log "debootstrap --variant=minbase $codename from $mirror (about a minute; log: $(rel "$logf"))"
  mkdir -p "$TOLLGATE_STATE_DIR"
  if ! timeout 900 debootstrap --variant=minbase --include=ca-certificates,libssl3 \
    "$codename" "$rootfs" "$mirror" >"$logf" 2>&1; then
    tail -n 20 "$logf" >&2
    rm -rf "$rootfs"
    die "debootstrap failed; see $(rel "$logf")"
  fi
  # Trim what a runtime base does not need (the package cache and lists, docs, locales).
  rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  log "podman import -> $name ($(du -sh "$rootfs" | cut -f1))"
  tar --numeric-owner -C "$rootfs" -c . |
    tg_podman import -q \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - "$name" >/dev/null
  rm -rf "$rootfs"
  mkdir -p "$IMAGE_TOOLS_DIR"
  log "podman save $name -> $(rel "$archive")"
  tg_podman save -q -o "$archive.tmp" "$name"
  mv "$archive.tmp" "$archive"
  printf '%s\n' "$name"
}

# image_build BASE TAG: builds TAG (the Containerfile's default target, the runtime image) and
# the mock-upstream test image from the host's debug binaries on BASE (see the header).
image_build() {
  local base="${1:?image_build BASE TAG}" tag="${2:?}" bin_dir ctx bin revision
  build_binaries control-api gateway mock-upstream
  bin_dir="$(tollgate_bin_dir)"
  ctx="$TOLLGATE_STATE_DIR/image-binaries"
  rm -rf "$ctx"
  mkdir -p "$ctx/out"
  for bin in tollgate-gateway tollgate-control-api tollgate-mock-upstream; do
    cp "$bin_dir/$bin" "$ctx/out/$bin"
    if command -v strip >/dev/null 2>&1; then strip --strip-debug "$ctx/out/$bin"; fi
  done
  revision="$(git -C "$TOLLGATE_ROOT" rev-parse HEAD 2>/dev/null || true)"
  local common=(
    build --pull=never --network host -f "$TOLLGATE_ROOT/Containerfile"
    --build-arg "RUNTIME_IMAGE=$base" --build-context "build=$ctx"
  )
  local logf="$TOLLGATE_STATE_DIR/image-build.log"
  log "podman build (runtime: the default target) -> $IMAGE_REPOSITORY:$tag  (log: $(rel "$logf"))"
  if ! tg_podman_timeout 900 "${common[@]}" --build-arg "VERSION=$tag" --build-arg "REVISION=$revision" \
    -t "$IMAGE_REPOSITORY:$tag" "$TOLLGATE_ROOT" >"$logf" 2>&1; then
    tail -n 30 "$logf" >&2
    die "podman build of the runtime image failed; see $(rel "$logf")"
  fi
  # The build stage must have been replaced, never run (no Rust image here).
  if grep -q 'FROM .*rust' "$logf"; then
    die "podman build ran the Containerfile's build stage instead of using the host's binaries"
  fi
  log "podman build --target mock-upstream -> $IMAGE_MOCK_REPOSITORY:$tag"
  if ! tg_podman_timeout 600 "${common[@]}" --target mock-upstream -t "$IMAGE_MOCK_REPOSITORY:$tag" \
    "$TOLLGATE_ROOT" >>"$logf" 2>&1; then
    tail -n 30 "$logf" >&2
    die "podman build of the mock-upstream image failed; see $(rel "$logf")"
  fi
  tg_podman image prune -f >/dev/null 2>&1 || true # the previous builds' untagged images
  log "built $IMAGE_REPOSITORY:$tag ($(tg_podman image inspect --format '{{.Size}}' "$IMAGE_REPOSITORY:$tag" | numfmt --to=iec))"
}

IMAGE_CONTAINERS=(tollgate-image-gateway tollgate-image-control-api tollgate-image-migrate tollgate-image-mock)
IMAGE_VOLUME=tollgate-image-spool

# _image_cleanup: removes the stage's containers (their logs saved in .tollgate/) and the mock.
_image_cleanup() {
  local c
  for c in "${IMAGE_CONTAINERS[@]}"; do
    if tg_podman container exists "$c" 2>/dev/null; then
      tg_podman logs "$c" >"$TOLLGATE_STATE_DIR/image-${c#tollgate-image-}.log" 2>&1 || true
      tg_podman_timeout 60 rm -f -t 5 "$c" >/dev/null 2>&1 || true
    fi
  done
  tg_podman_timeout 60 volume rm -f "$IMAGE_VOLUME" >/dev/null 2>&1 || true
  stop_bg image-mock-upstream
}

# _image_run NAME ARGS...: podman run -d NAME with the chart's pod settings (non-root, read-only
# root filesystem with a tmpfs /tmp, no capabilities, no privilege escalation), on the host
# network (the addresses are 127.0.0.1 in ARGS' environment).
_image_run() {
  local name="$1"
  shift
  tg_podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  tg_podman_timeout 120 run -d --name "$name" --init --network host --read-only --read-only-tmpfs \
    --cap-drop ALL --security-opt no-new-privileges "$@" >/dev/null
}

# _image_wait NAME URL: waits for URL to answer 200 while container NAME runs.
_image_wait() {
  local name="$1" url="$2" deadline=$((SECONDS + 60))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null)" = 200 ]; do
    if [ "$(tg_podman inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ] ||
      ((SECONDS >= deadline)); then
      tg_podman logs --tail 30 "$name" >&2 || true
      die "container $name did not answer $url"
    fi
    sleep 0.5
  done
}

# _image_api METHOD PATH [BODY]: a call to the containerized control API; prints the body, dies
# unless the status is 2xx.
_image_api() {
  local out code
  out="$(curl -sS --max-time 10 -X "$1" "$IMAGE_API_URL/api/v1$2" -H "Authorization: Bearer $IMAGE_ADMIN_KEY" \
    -H 'content-type: application/json' ${3:+--data "$3"} -w '\n%{http_code}')"
  code="${out##*$'\n'}"
  out="${out%$'\n'*}"
  case "$code" in 2??) printf '%s\n' "$out" ;; *) die "control API $1 $2: HTTP $code: $out" ;; esac
}

# _image_json FIELD: FIELD of the JSON object on stdin.
_image_json() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# _image_check_uid NAME: every process of container NAME runs as IMAGE_UID (read from /proc on
# the host, not from inside the container).
_image_check_uid() {
  local name="$1" pids pid uids n=0
  pids="$(tg_podman top "$name" hpid | tail -n +2)"
  for pid in $pids; do
    uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")"
    [ "$uids" = "$IMAGE_UID $IMAGE_UID $IMAGE_UID $IMAGE_UID" ] ||
      die "container $name: process $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline")) runs as uids $uids, not $IMAGE_UID"
    n=$((n + 1))
  done
  [ "$n" -ge 2 ] || die "container $name: expected the init and the binary, found $n processes"
  log "container $name: its $n processes (init and binary) run as uid $IMAGE_UID"
}

# _image_check_context: the build context the real build sends, with .containerignore applied:
# the workspace's sources in, build output and local state out.
_image_check_context() {
  local base="$1" dir listing
  dir="$(mktemp -d)"
  printf 'FROM %s\nCOPY . /context\n' "$base" >"$dir/Containerfile"
  tg_podman_timeout 300 build --pull=never -q -f "$dir/Containerfile" --ignorefile "$TOLLGATE_ROOT/.containerignore" \
    -t localhost/tollgate-context-check "$TOLLGATE_ROOT" >/dev/null
  rm -rf "$dir"
  listing="$(tg_podman_timeout 60 run --rm --network none localhost/tollgate-context-check \
    sh -c 'cd /context && ls -A && du -sk . | cut -f1')"
  tg_podman rmi -f localhost/tollgate-context-check >/dev/null 2>&1 || true
  local want
  for want in Cargo.toml Cargo.lock core gateway control-api bench migrations; do
    grep -qx "$want" <<<"$listing" || die ".containerignore: the build context lacks $want"
  done
  for want in target .git .tools .tollgate .venv .venv-litellm; do
    if grep -qx "$want" <<<"$listing"; then die ".containerignore: the build context holds $want"; fi
  done
  log "the build context (.containerignore applied): $(tail -n 1 <<<"$listing") KiB, sources only"
}

# _image_check_chart IMAGE TAG BINS: the chart runs this image as built: its default image name and
# tag (image.repository, the appVersion), its user ids, the commands' paths among BINS (the
# image's /usr/local/bin) and the spool path it mounts (the image's TOLLGATE_SPOOL_DIR).
_image_check_chart() {
  local image="$1" tag="$2" bins="$3" chart="$TOLLGATE_ROOT/charts/tollgate" repo id cmd n=0
  repo="$(sed -n '/^image:/,/^[^ #]/s/^  repository: *"\{0,1\}\([^" ]*\)"\{0,1\}.*/\1/p' "$chart/values.yaml")"
  [ "localhost/$repo" = "$IMAGE_REPOSITORY" ] ||
    die "charts/tollgate/values.yaml image.repository is '$repo'; the image is built as ${IMAGE_REPOSITORY#localhost/}:$tag"
  local ids
  ids="$(sed -n 's/^ *\(runAsUser\|runAsGroup\|fsGroup\): *\([0-9]*\).*/\2/p' "$chart/values.yaml")"
  while read -r id; do
    [ "$id" = "$IMAGE_UID" ] || die "charts/tollgate/values.yaml runs as $id; the image's user is $IMAGE_UID"
    n=$((n + 1))
  done <<<"$ids"
  [ "$n" -ge 2 ] || die "charts/tollgate/values.yaml: no runAsUser found"
  for cmd in $(grep -ho '"/usr/local/bin/[^"]*"' "$chart"/templates/*.yaml | tr -d '"' | sort -u); do
    case " $bins " in *" ${cmd#/usr/local/bin/} "*) ;; *) die "the chart runs $cmd, which $image does not hold" ;; esac
  done
  grep -q 'mountPath: /var/lib/tollgate/spool$' "$chart/templates/gateway-deployment.yaml" ||
    die "the chart mounts the spool elsewhere than the image's /var/lib/tollgate/spool"
  log "the chart's defaults name this image (${repo}:$tag), its user ($IMAGE_UID), its binaries and its spool"
}

stage_image() {
  trap '_image_cleanup' EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$TOLLGATE_STATE_DIR"
  if ! ensure_podman; then
    stage_skip image "podman could not be installed or cannot run here (apt-get install podman runc catatonit debootstrap, then podman info)"
    return 0
  fi
  local start=$SECONDS tag base
  tag="$(image_tag)"
  base="$(image_base)"
  log "base ready ($((SECONDS - start))s)"
  image_build "$base" "$tag"
  local image="$IMAGE_REPOSITORY:$tag"

  # The image's metadata: what the chart and a runtime rely on.
  local user version env want
  user="$(tg_podman image inspect --format '{{.Config.User}}' "$image")"
  version="$(tg_podman image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")"
  env="$(tg_podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image")"
  [ "$user" = "$IMAGE_UID:$IMAGE_UID" ] || die "$image: USER is '$user', not $IMAGE_UID:$IMAGE_UID"
  [ "$version" = "$tag" ] || die "$image: label org.opencontainers.image.version is '$version', not $tag"
  for want in TOLLGATE_LISTEN=0.0.0.0:8080 TOLLGATE_ADMIN_LISTEN=0.0.0.0:9090 TOLLGATE_API_LISTEN=0.0.0.0:8081 \
    TOLLGATE_SPOOL_DIR=/var/lib/tollgate/spool; do
    grep -qxF "$want" <<<"$env" || die "$image: no ENV $want (has: $(tr '\n' ' ' <<<"$env"))"
  done
  log "image config: USER $user, version $version, ENV $(grep '^TOLLGATE_' <<<"$env" | tr '\n' ' ')"
  local bins
  bins="$(tg_podman_timeout 60 run --rm --network none "$image" ls /usr/local/bin | tr '\n' ' ')"
  [ "$bins" = "tollgate-control-api tollgate-gateway " ] ||
    die "$image: /usr/local/bin holds '$bins', not just tollgate-control-api and tollgate-gateway"
  _image_check_chart "$image" "$tag" "$bins"
  _image_check_context "$base"

  # The mock upstream on the host (the gateway's upstream), a fresh database, free ports.
  local out ports mock_url db="tollgate_image" db_url
  out="$(free_port 5)"
  mapfile -t ports <<<"$out"
  mock_url="http://127.0.0.1:${ports[0]}"
  start_bg image-mock-upstream "$(tollgate_bin_dir)/tollgate-mock-upstream" --listen "127.0.0.1:${ports[0]}"
  wait_http "$mock_url/v1/models" 30 "$(bg_pid image-mock-upstream)" || die "the mock upstream did not start"
  create_db "$db" --drop
  db_url="$TOLLGATE_PG_BASE/$db"
  IMAGE_ADMIN_KEY="$(new_admin_key)"
  IMAGE_API_URL="http://127.0.0.1:${ports[1]}"
  local gw_url="http://127.0.0.1:${ports[2]}" gw_admin_url="http://127.0.0.1:${ports[3]}"
  # The spool on a fresh volume, as the chart's emptyDir or PVC (podman's tmpfs would be root's:
  # podman 4.3 keeps the image directory's mode but not its owner; a new volume takes both).
  tg_podman volume rm -f "$IMAGE_VOLUME" >/dev/null 2>&1 || true
  tg_podman volume create "$IMAGE_VOLUME" >/dev/null
  local spool=(-v "$IMAGE_VOLUME:/var/lib/tollgate/spool")
  local secrets=(-e "TOLLGATE_DATABASE_URL=$db_url" -e "TOLLGATE_REDIS_URL=$TOLLGATE_REDIS_URL")

  # 1. Migrations, as the chart's Job runs them.
  log "podman run $image tollgate-control-api migrate"
  tg_podman rm -f -t 0 tollgate-image-migrate >/dev/null 2>&1 || true
  if ! tg_podman_timeout 120 run --name tollgate-image-migrate --init --network host --read-only \
    --cap-drop ALL --security-opt no-new-privileges "${secrets[@]}" \
    "$image" /usr/local/bin/tollgate-control-api migrate >"$TOLLGATE_STATE_DIR/image-migrate.log" 2>&1; then
    tail -n 20 "$TOLLGATE_STATE_DIR/image-migrate.log" >&2
    die "tollgate-control-api migrate failed in the container"
  fi
  local applied
  applied="$(PGCONNECT_TIMEOUT=5 psql -XAtq "$db_url" -c 'SELECT count(*) FROM _sqlx_migrations WHERE success')"
  [ "$applied" -gt 0 ] || die "no migrations applied in $db"
  log "the container applied $applied migrations to $db"

  # 2. The control API and the gateway, migrations off (as in the chart).
  log "podman run $image tollgate-control-api serve  (API on $IMAGE_API_URL)"
  _image_run tollgate-image-control-api "${secrets[@]}" -e "TOLLGATE_API_LISTEN=127.0.0.1:${ports[1]}" \
    -e "TOLLGATE_ADMIN_API_KEYS=$IMAGE_ADMIN_KEY" -e TOLLGATE_MIGRATE_ON_START=false \
    "$image" /usr/local/bin/tollgate-control-api serve
  log "podman run $image (default command: the gateway on $gw_url, upstream the mock at $mock_url)"
  _image_run tollgate-image-gateway "${secrets[@]}" "${spool[@]}" \
    -e "TOLLGATE_LISTEN=127.0.0.1:${ports[2]}" -e "TOLLGATE_ADMIN_LISTEN=127.0.0.1:${ports[3]}" \
    -e "TOLLGATE_UPSTREAM_URL=$mock_url" -e TOLLGATE_UPSTREAM_API_KEY=sk-local-upstream \
    -e TOLLGATE_MIGRATE_ON_START=false -e TOLLGATE_GRACE_PERIOD_SECONDS=1 \
    -e TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS=5 "$image"
  _image_wait tollgate-image-control-api "$IMAGE_API_URL/ready"
  _image_wait tollgate-image-gateway "$gw_admin_url/ready"
  log "both containers ready ($((SECONDS - start))s since the stage started)"
  _image_check_uid tollgate-image-control-api
  _image_check_uid tollgate-image-gateway
  # The root filesystem is read-only; the spool is writable by the gateway's user.
  tg_podman_timeout 30 exec tollgate-image-gateway sh -c \
    'touch /var/lib/tollgate/spool/.probe && rm /var/lib/tollgate/spool/.probe && ! touch /var/lib/tollgate/probe 2>/dev/null' ||
    die "container tollgate-image-gateway: the spool is not writable or the root filesystem is"

  # 3. A key through the containerized control API, a call through the containerized gateway.
  local model="image-test-model" user_id key
  _image_api POST /models "{\"id\":\"$model\",\"input_cost_per_token\":0.000001,\"output_cost_per_token\":0.000002}" >/dev/null
  user_id="$(_image_api POST /users "{\"email\":\"image-$(random_hex 4)@example.com\",\"name\":\"Image test\"}" | _image_json id)"
  _image_api POST /subscriptions "{\"user_id\":\"$user_id\",\"model_id\":\"$model\",\"limits\":{\"tpm\":100000,\"max_budget\":10,\"budget_period\":\"monthly\"}}" >/dev/null
  key="$(_image_api POST /keys "{\"user_id\":\"$user_id\",\"name\":\"image-test\",\"models\":[\"$model\"],\"limits\":{\"rpm\":60}}" | _image_json key)"
  log "made a model, a user, a subscription and a key through the container's control API"
  local code body
  body="$(curl -sS --max-time 15 "$gw_url/v1/chat/completions" -H "Authorization: Bearer $key" \
    -H 'content-type: application/json' -w '\n%{http_code}' \
    -d "{\"model\":\"$model\",\"max_tokens\":3,\"messages\":[{\"role\":\"user\",\"content\":\"hi from the image test\"}]}")"
  code="${body##*$'\n'}"
  body="${body%$'\n'*}"
  [ "$code" = 200 ] || die "chat completion through the gateway container: HTTP $code: $body"
  python3 - "$body" "$model" <<'PY' || die "chat completion through the gateway container: not the mock's answer: $body"
import json, sys
v = json.loads(sys.argv[1])
assert v["object"] == "chat.completion", v
assert v["id"].startswith("mock-"), v
assert v["model"] == sys.argv[2], v
assert v["choices"][0]["message"]["content"] == "tok tok tok ", v
assert v["usage"]["completion_tokens"] == 3, v
PY
  log "chat completion through the gateway container: 200, the mock's answer"
  local deadline=$((SECONDS + 20)) requests=0
  while :; do
    requests="$(_image_api GET "/usage?group_by=model" | python3 -c '
import json, sys
rows = json.load(sys.stdin)["data"]
print(sum(int(r["requests"]) for r in rows if r.get("group") == sys.argv[1]))' "$model")"
    [ "$requests" -ge 1 ] && break
    ((SECONDS < deadline)) || die "the call's usage row did not reach PostgreSQL within 20s"
    sleep 0.5
  done
  [ "$requests" = 1 ] || die "usage of $model: $requests requests, expected 1"
  log "its usage row reached PostgreSQL (GET /usage?group_by=model: 1 request for $model)"

  # 4. The mock-upstream test image answers too.
  log "podman run $IMAGE_MOCK_REPOSITORY:$tag on 127.0.0.1:${ports[4]}"
  _image_run tollgate-image-mock "$IMAGE_MOCK_REPOSITORY:$tag" --listen "127.0.0.1:${ports[4]}"
  _image_wait tollgate-image-mock "http://127.0.0.1:${ports[4]}/v1/models"
  log "image stage done in $((SECONDS - start))s: $image and $IMAGE_MOCK_REPOSITORY:$tag in podman's store under $TOLLGATE_PODMAN_DIR"
}
