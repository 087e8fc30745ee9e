"""The Grafana dashboard (../dashboards/tollgate.json) against a real Prometheus.

Run by scripts/test's `dashboard` stage (scripts/lib/dashboard.sh), which starts a gateway, a
control API, a mock upstream and a Prometheus scraping both binaries, then calls:

  dashboard.py wait  PROM_URL                 until Prometheus scrapes every target (all up)
  dashboard.py load  GATEWAY_URL API_URL      traffic that gives every panel data (admin key in
                                              TOLLGATE_ADMIN_KEY; seconds in DASHBOARD_LOAD_SECONDS)
  dashboard.py check PROM_URL DASHBOARD_JSON  every panel target's expr evaluated through
                                              Prometheus's HTTP API: each must return at least one
                                              series with a number (not only NaN)

Standard library only. The check reads the dashboard file, so a panel added later is checked too.
"""

import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

TIMEOUT = 10


def http(method, url, body=None, headers=None):
    """(status, body bytes); HTTP errors are answers, not exceptions."""
    data = json.dumps(body).encode() if body is not None else None
    hdrs = dict(headers or {})
    if data is not None:
        hdrs["content-type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def prom_get(prom, path, **params):
    url = prom + path + ("?" + urllib.parse.urlencode(params) if params else "")
    status, body = http("GET", url)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {"status": "error", "error": body[:200].decode(errors="replace")}
    if status != 200 or doc.get("status") != "success":
        return None, f"HTTP {status}: {doc.get('errorType', '')} {doc.get('error', '')}".strip()
    return doc["data"], None


# ---------------------------------------------------------------- wait


def cmd_wait(prom, timeout=60):
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        data, err = prom_get(prom, "/api/v1/targets")
        if data is not None:
            targets = data.get("activeTargets", [])
            health = {t["labels"].get("job", "?"): t["health"] for t in targets}
            last = ", ".join(f"{j}={h}" for j, h in sorted(health.items())) or "no targets"
            if targets and all(h == "up" for h in health.values()):
                print(f"prometheus scrapes: {last}", file=sys.stderr)
                return 0
        else:
            last = err
        time.sleep(0.5)
    sys.exit(f"prometheus targets not all up after {timeout}s: {last}")


# ---------------------------------------------------------------- load


def cmd_load(gateway, api, seconds):
    admin = {"Authorization": "Bearer " + os.environ["TOLLGATE_ADMIN_KEY"]}
    base = api + "/api/v1"
    counts = {}

    def note(what, status):
        counts.setdefault(what, {}).setdefault(status, 0)
        counts[what][status] += 1
        return status

    def admin_call(method, path, body=None, want=(200, 201)):
        status, out = http(method, base + path, body, admin)
        note(f"control-api {method} {path.split('/')[1]}", status)
        if want and status not in want:
            sys.exit(f"{method} {path}: {status} {out[:300]!r}")
        return json.loads(out) if out else None

    suffix = uuid.uuid4().hex[:8]
    models = [f"dash-a-{suffix}", f"dash-b-{suffix}"]
    for m in models:
        admin_call("POST", "/models", {"id": m, "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002})
    # a user without limits of their own, subscribed to both models with token and budget limits
    u1 = admin_call("POST", "/users", {"email": f"dash-1-{suffix}@example.com", "name": "Dash One"})["id"]
    for m in models:
        admin_call("POST", "/subscriptions", {"user_id": u1, "model_id": m,
                                              "limits": {"tpm": 10_000_000, "max_budget": 1000, "budget_period": "monthly"}})
    # a user over a soft RPM limit after one request: admitted with a warning (limit_warnings_total)
    u2 = admin_call("POST", "/users", {"email": f"dash-2-{suffix}@example.com", "name": "Dash Two",
                                       "limits": {"rpm": 1, "enforcement": "soft"}})["id"]
    admin_call("POST", "/subscriptions", {"user_id": u2, "model_id": models[0]})
    key_limits = {"rpm": 1_000_000, "tpm": 10_000_000}
    k1 = admin_call("POST", "/keys", {"user_id": u1, "name": "dash-main", "models": models, "limits": key_limits})
    # two requests a minute, then 429 (rejections_total{reason="rpm",scope="key"})
    tiny = admin_call("POST", "/keys", {"user_id": u1, "name": "dash-tiny", "models": [models[0]], "limits": {"rpm": 2}})
    k2 = admin_call("POST", "/keys", {"user_id": u2, "name": "dash-soft", "models": [models[0]]})
    bad = "sk-tg-" + "x" * 43

    def auth(key):
        return {"Authorization": "Bearer " + key}

    # The gateway learns about new models through invalidation: wait until it lists them.
    deadline = time.time() + 15
    while True:
        status, out = http("GET", gateway + "/v1/models", headers=auth(k1["key"]))
        if status == 200 and {m["id"] for m in json.loads(out)["data"]} == set(models):
            break
        if time.time() > deadline:
            sys.exit(f"the gateway never listed the new models: {status} {out[:300]!r}")
        time.sleep(0.1)

    def chat(what, key, model, stream=False, usage=False):
        body = {"model": model, "messages": [{"role": "user", "content": "one two three"}]}
        if stream:
            body["stream"] = True
            if usage:
                body["stream_options"] = {"include_usage": True}
        status, out = http("POST", gateway + "/v1/chat/completions", body, auth(key))
        if stream and status == 200 and b"data: [DONE]" not in out:
            sys.exit(f"{what}: a stream without its end: {out[-300:]!r}")
        return note(what, status)

    end = time.time() + seconds
    i = 0
    while time.time() < end:
        for m in models:
            chat("chat", k1["key"], m)
        chat("chat stream", k1["key"], models[0], stream=True, usage=True)
        chat("chat stream", k1["key"], models[1], stream=True)
        chat("tiny rpm key", tiny["key"], models[0])                 # 429 after two
        chat("model not allowed", tiny["key"], models[1])            # 403
        if i % 5 == 0:
            # 401; not more often: past failed_auth_per_minute (60) failures an address is
            # throttled, and its uncached keys too (each PATCH below uncaches the main key)
            chat("bad key", bad, models[0])
        chat("soft limit", k2["key"], models[0])                     # 200, a warning
        # the control API: reads, and errors of several kinds
        admin_call("GET", "/users?limit=5")
        admin_call("GET", f"/keys/{uuid.uuid4()}", want=(404,))
        admin_call("POST", "/models", {"id": models[0], "input_cost_per_token": 0, "output_cost_per_token": 0},
                   want=(409,))
        admin_call("POST", "/users", {"email": "not an email", "name": ""}, want=(400, 422))
        note("control-api without credentials", http("GET", base + "/users")[0])
        if i % 5 == 0:
            # an invalidation published to the gateways (invalidations_*)
            admin_call("PATCH", f"/keys/{k1['id']}", {"limits": key_limits})
        if i % 10 == 0:
            # a model sync (the stand-in LiteLLM serves /model/info)
            admin_call("POST", "/models/sync", {}, want=(200, 201, 502))
        i += 1
        time.sleep(0.1)

    for what, by_status in sorted(counts.items()):
        print(f"  {what}: " + ", ".join(f"{n}x {s}" for s, n in sorted(by_status.items())), file=sys.stderr)
    if counts.get("chat", {}).get(429) or counts.get("chat stream", {}).get(429):
        sys.exit("load: the main key was refused (429); its limits are not meant to be reached")
    wanted = {"chat": 200, "chat stream": 200, "tiny rpm key": 429, "model not allowed": 403, "bad key": 401,
              "soft limit": 200, "control-api without credentials": 401}
    missing = [f"{what} -> {status}" for what, status in wanted.items() if not counts.get(what, {}).get(status)]
    if missing:
        sys.exit("load: never got " + "; ".join(missing))


# ---------------------------------------------------------------- check

# Grafana's built-in variables, as Grafana would set them for a short dashboard range.
def builtins(interval):
    seconds = int(re.fullmatch(r"(\d+)([smh])", interval).group(1)) * {"s": 1, "m": 60, "h": 3600}[interval[-1]]
    return {"__rate_interval": interval, "__interval": interval, "__range": interval,
            "__range_s": str(seconds), "__range_ms": str(seconds * 1000), "__interval_ms": str(seconds * 1000)}


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def uses_datasource_var(ds):
    uid = ds.get("uid") if isinstance(ds, dict) else ds
    return uid in ("${datasource}", "$datasource")


def cmd_check(prom, path, interval):
    dash = json.loads(open(path).read())
    problems = []
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    dsvar = variables.get("datasource")
    if not dsvar or dsvar.get("type") != "datasource" or dsvar.get("query") != "prometheus":
        problems.append("templating: no `datasource` variable of type datasource, query prometheus")
    values = builtins(interval)
    for name, v in variables.items():
        if v.get("type") == "datasource":
            continue
        if v.get("type") != "query" or not v.get("includeAll"):
            problems.append(f"variable {name}: only datasource variables and query variables with All are checked")
            continue
        values[name] = v.get("allValue") or ".*"

    def substitute(expr):
        def one(m):
            name = m.group(1) or m.group(2)
            if name not in values:
                raise KeyError(name)
            return values[name]
        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)

    known, err = prom_get(prom, "/api/v1/label/__name__/values")
    if known is None:
        sys.exit(f"prometheus: metric names: {err}")
    known = set(known)

    def query(what, expr):
        try:
            q = substitute(expr)
        except KeyError as e:
            return f"{what}: unknown variable ${e.args[0]} in {expr}"
        for name in sorted(set(re.findall(r"\btollgate_\w+", q))):
            if name not in known:
                return f"{what}: no metric {name} was scraped (in {q})"
        data, err = prom_get(prom, "/api/v1/query", query=q)
        if data is None:
            return f"{what}: error: {err} (query {q})"
        result = data.get("result")
        if data.get("resultType") == "scalar":
            result = [{"metric": {}, "value": result}]
        if not result:
            return f"{what}: no series (query {q})"
        numbers = [s for s in result if not math.isnan(float(s["value"][1]))]
        if not numbers:
            return f"{what}: only NaN ({len(result)} series; query {q})"
        print(f"  ok  {what}: {len(result)} series", file=sys.stderr)
        return None

    # label_values(metric{...}, label): the metric must be scraped (the label may be absent here,
    # e.g. namespace outside Kubernetes).
    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", q or "")
        if not m:
            problems.append(f"variable {name}: not a label_values(...) query: {q!r}")
            continue
        if not uses_datasource_var(v.get("datasource")):
            problems.append(f"variable {name}: its datasource is not ${{datasource}}")
        problem = query(f"variable {name}", "count(%s)" % m.group(1))
        if problem:
            problems.append(problem)

    checked = 0
    for p in walk_panels(dash.get("panels", [])):
        if p.get("type") == "row":
            continue
        title = p.get("title", f"panel {p.get('id')}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
            continue
        if not uses_datasource_var(p.get("datasource")):
            problems.append(f"panel {title!r}: its datasource is not ${{datasource}}")
        for t in targets:
            what = f"panel {title!r} target {t.get('refId')}"
            if not uses_datasource_var(t.get("datasource", p.get("datasource"))):
                problems.append(f"{what}: its datasource is not ${{datasource}}")
            if not t.get("expr"):
                problems.append(f"{what}: no expr")
                continue
            if re.search(r"rate\([^\[]*\[(?!\$__rate_interval\])", t["expr"]):
                problems.append(f"{what}: a rate()/irate() whose range is not $__rate_interval")
            problem = query(what, t["expr"])
            checked += 1
            if problem:
                problems.append(problem)
    if problems:
        sys.exit("dashboard check failed:\n  " + "\n  ".join(problems))
    print(f"dashboard: {checked} panel queries returned data", file=sys.stderr)


def main(argv):
    if len(argv) >= 2 and argv[0] == "wait":
        return cmd_wait(argv[1])
    if len(argv) >= 3 and argv[0] == "load":
        return cmd_load(argv[1], argv[2], float(os.environ.get("DASHBOARD_LOAD_SECONDS", "15")))
    if len(argv) >= 3 and argv[0] == "check":
        return cmd_check(argv[1], argv[2], os.environ.get("DASHBOARD_INTERVAL", "1m"))
    sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
