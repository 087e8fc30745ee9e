"""The fault matrix: three gateway replicas under steady load while Redis, PostgreSQL, the upstream
or one replica is SIGKILLed, SIGSTOPped for 5 s, or restarted, and while Redis flaps. Every part
is a process of this run's own (its own PostgreSQL cluster and Redis on free ports: the shared
ones are never touched). For each cell it reports the answers by status, the longest answer, what
an RPM key and a budget key were admitted against their limits, usage rows answered vs recorded,
the budget in Redis vs PostgreSQL's rollups, and the time to recover; it writes the table to
docs/reliability.md and the raw figures to .tollgate/fault/results.json.

Run through scripts/fault (which builds the binaries); `--cells redis-stop,postgres-kill` runs some.
"""

import argparse
import collections
import http.client
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("TOLLGATE_BIN_DIR", ROOT / "target" / "debug"))
STATE = ROOT / ".tollgate" / "fault"
PG_BIN = pathlib.Path(sorted(pathlib.Path("/usr/lib/postgresql").iterdir())[-1]) / "bin"

RPM_LIMIT = 120
BUDGET_USD = 0.5
COST_PER_REQUEST = 0.01  # 4 completion tokens at $0.0025 (the mock's usage)
UPSTREAM_TIMEOUT_S = 10
LOAD_RPS = 12  # per key: about twice what the RPM key may have in the cell
CELL_SECONDS = 22  # load per cell: 4 s before the fault, the fault, the rest after


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


class Proc:
    """A background process this run owns, restartable with the same command."""

    def __init__(self, name, cmd, env=None, port=None, user=None):
        self.name, self.cmd, self.env, self.port, self.user = name, cmd, env, port, user
        self.proc = None
        self.logf = open(STATE / f"{name}.log", "ab")

    def start(self):
        cmd = self.cmd if not self.user else ["runuser", "-u", self.user, "--", *self.cmd]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(self.env or {})}, stdout=self.logf, stderr=self.logf)
        if self.port:
            wait_port(self.port)

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait()

    def stop(self, timeout=15):
        self.signal(signal.SIGTERM)
        if self.proc:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class Postgres:
    """A PostgreSQL cluster of this run's own, in a temporary directory."""

    def __init__(self):
        self.port = free_port()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-fault-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres"],
                       check=True, stdout=subprocess.DEVNULL)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/tollgate"

    def ctl(self, *args):
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w",
                        "-l", str(self.dir / "log"), "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", *args],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self):
        self.ctl("start")
        wait_port(self.port)

    def pids(self):
        """The postmaster and its children."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, 0)
        except (OSError, ValueError, IndexError):
            return []
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def signal(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.signal(signal.SIGKILL)
        deadline = time.time() + 10
        while self.pids() and time.time() < deadline:
            time.sleep(0.1)

    def stop(self):
        self.ctl("stop", "-m", "fast")

    def psql(self, sql):
        return subprocess.run(["psql", "-XAtq", self.url, "-c", sql], capture_output=True, text=True, check=True).stdout.strip()

    def destroy(self):
        try:
            self.stop()
        except subprocess.CalledProcessError:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    def __init__(self):
        STATE.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres()
        self.pg.start()
        subprocess.run(["psql", "-Xq", self.pg.url.rsplit("/", 1)[0] + "/postgres", "-c", "CREATE DATABASE tollgate"], check=True)
        self.redis_port = free_port()
        self.redis = Proc("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(STATE)], port=self.redis_port)
        self.redis.start()
        redis_url = f"redis://127.0.0.1:{self.redis_port}"
        self.upstream_port = free_port()
        self.upstream = Proc("upstream", [str(BIN / "tollgate-mock-upstream"), "--listen", f"127.0.0.1:{self.upstream_port}"],
                             port=self.upstream_port)
        self.upstream.start()
        self.admin_key = "sk-tg-admin-" + uuid.uuid4().hex
        self.api_port = free_port()
        self.api = Proc("control-api", [str(BIN / "tollgate-control-api")], port=self.api_port, env={
            "TOLLGATE_DATABASE_URL": self.pg.url, "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_API_LISTEN": f"127.0.0.1:{self.api_port}", "TOLLGATE_ADMIN_API_KEYS": self.admin_key})
        self.api.start()
        self.gateways = []
        for i in range(3):
            port, admin = free_port(), free_port()
            spool = STATE / f"spool-{i}"
            spool.mkdir(exist_ok=True)
            self.gateways.append(Proc(f"gateway-{i}", [str(BIN / "tollgate-gateway")], port=port, env={
                "TOLLGATE_DATABASE_URL": self.pg.url, "TOLLGATE_REDIS_URL": redis_url,
                "TOLLGATE_LISTEN": f"127.0.0.1:{port}", "TOLLGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                "TOLLGATE_UPSTREAM_URL": f"http://127.0.0.1:{self.upstream_port}",
                "TOLLGATE_UPSTREAM_TIMEOUT_SECONDS": str(UPSTREAM_TIMEOUT_S), "TOLLGATE_SPOOL_DIR": str(spool),
                "TOLLGATE_EXPECTED_REPLICAS": "3", "TOLLGATE_REDIS_TIMEOUT_MS": "100",
                "TOLLGATE_BUDGET_RECONCILE_SECONDS": "5", "TOLLGATE_MIGRATE_ON_START": "false",
                "TOLLGATE_GRACE_PERIOD_SECONDS": "1", "TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS": "5",
                "TOLLGATE_FAILED_AUTH_PER_MINUTE": "100000", "TOLLGATE_ACCESS_LOG": "false"}))
            self.gateways[-1].start()
        self.api_call("POST", "/models", {"id": "m", "input_cost_per_token": 0, "output_cost_per_token": COST_PER_REQUEST / 4})

    def api_call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        conn.request(method, "/api/v1" + path, body=json.dumps(body) if body is not None else None,
                     headers={"authorization": f"Bearer {self.admin_key}", "content-type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"null")
        if resp.status >= 300:
            raise SystemExit(f"{method} {path}: {resp.status} {data}")
        return data

    def keys(self, cell):
        """A fresh user with an RPM key, a budget key and an unlimited probe key."""
        user = self.api_call("POST", "/users", {"email": f"{cell}-{uuid.uuid4().hex[:8]}@example.com", "name": cell})
        self.api_call("POST", "/subscriptions", {"user_id": user["id"], "model_id": "m"})
        made = {}
        for name, limits in [("rpm", {"rpm": RPM_LIMIT}), ("budget", {"max_budget": BUDGET_USD, "budget_period": "none"}),
                             ("probe", {})]:
            k = self.api_call("POST", "/keys", {"user_id": user["id"], "name": name, "models": ["m"], "limits": limits})
            made[name] = (k["key"], k["id"])
        return made

    def redis_get(self, key):
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "GET", key], capture_output=True, text=True).stdout.strip()
        return int(out) if out.lstrip("-").isdigit() else None

    def destroy(self):
        for p in [*self.gateways, self.api, self.upstream]:
            p.stop()
        self.redis.kill()
        self.pg.destroy()


def chat(port, key, timeout=UPSTREAM_TIMEOUT_S + 5):
    started = time.time()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, resp.getheader("x-request-id"), time.time() - started
    except (OSError, http.client.HTTPException):
        return "conn_error", None, time.time() - started


class Load:
    """Steady load on a key, round-robin over the replicas, `rps` a second, from a thread each."""

    def __init__(self, stack, key, rps):
        self.stack, self.key, self.rps = stack, key, rps
        self.results = []
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(4)]
        for t in self.threads:
            t.start()

    def run(self, n):
        i, every = n, 4 / self.rps
        next_at = time.time()
        while self.running:
            gw = self.stack.gateways[i % len(self.stack.gateways)]
            result = chat(gw.port, self.key)
            with self.lock:
                self.results.append(result)
            i += 1
            next_at += every
            time.sleep(max(0, next_at - time.time()))

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join()
        return self.results


def fault_actions(stack):
    """cell name -> (what fails, action taking about 5 s)."""
    def kill_for(p, start):
        def act():
            p.kill()
            time.sleep(5)
            start()
        return act

    def stop_for(p):
        def act():
            p.signal(signal.SIGSTOP)
            time.sleep(5)
            p.signal(signal.SIGCONT)
        return act

    def restart(p, start):
        def act():
            p.stop()
            start()
        return act

    def flap():
        for _ in range(10):
            stack.redis.kill()
            time.sleep(1)
            stack.redis.start()
            time.sleep(1)

    replica = stack.gateways[2]
    return {
        "redis-kill": kill_for(stack.redis, stack.redis.start),
        "redis-stop": stop_for(stack.redis),
        "redis-restart": restart(stack.redis, stack.redis.start),
        "redis-flap": flap,
        "postgres-kill": kill_for(stack.pg, stack.pg.start),
        "postgres-stop": stop_for(stack.pg),
        "postgres-restart": restart(stack.pg, stack.pg.start),
        "upstream-kill": kill_for(stack.upstream, stack.upstream.start),
        "upstream-stop": stop_for(stack.upstream),
        "upstream-restart": restart(stack.upstream, stack.upstream.start),
        "replica-kill": kill_for(replica, replica.start),
        "replica-stop": stop_for(replica),
        "replica-restart": restart(replica, replica.start),
    }


def recovery_time(stack, key, since):
    """Seconds from `since` until every replica answers the probe key with 200."""
    deadline = time.time() + 60
    pending = list(stack.gateways)
    while pending and time.time() < deadline:
        pending = [g for g in pending if chat(g.port, key, timeout=5)[0] != 200]
        if pending:
            time.sleep(0.2)
    return round(time.time() - since, 1) if not pending else None


def run_cell(stack, name, action):
    log(f"cell {name}")
    keys = stack.keys(name)
    time.sleep(1)
    loads = {k: Load(stack, keys[k][0], LOAD_RPS) for k in ("rpm", "budget")}
    time.sleep(4)
    fault_started = time.time()
    action()
    fault_ended = time.time()
    recovered = recovery_time(stack, keys["probe"][0], fault_ended)
    time.sleep(max(0, CELL_SECONDS - (time.time() - fault_started) - 4))
    results = {k: l.stop() for k, l in loads.items()}

    answered = [r for rs in results.values() for r in rs]
    statuses = collections.Counter(str(r[0]) for r in answered)
    ok_ids = [r[1] for r in answered if r[0] == 200 and r[1]]
    # Rows reach PostgreSQL within the spool's replay back-off (at most 30 s) and the reconcile.
    deadline = time.time() + 60
    while True:
        recorded = int(stack.pg.psql("SELECT count(*) FROM usage_logs WHERE request_id IN (%s)" % ",".join(f"'{i}'" for i in ok_ids))) if ok_ids else 0
        if recorded >= len(ok_ids) or time.time() > deadline:
            break
        time.sleep(1)
    duplicates = int(stack.pg.psql("SELECT count(*) - count(DISTINCT request_id) FROM usage_logs"))
    time.sleep(6)  # one budget reconcile round
    budget_id = keys["budget"][1]
    pg_nanos = round(float(stack.pg.psql(f"SELECT coalesce(sum(cost), 0) FROM usage_daily WHERE key_id = '{budget_id}'")) * 1e9)
    redis_nanos = stack.redis_get(f"tg:{{key:{budget_id}}}:nb:all")
    spent_usd = pg_nanos / 1e9
    cell = {
        "cell": name,
        "statuses": dict(sorted(statuses.items())),
        "longest_s": round(max((r[2] for r in answered), default=0), 2),
        "rpm_admitted": sum(1 for r in results["rpm"] if r[0] == 200),
        "budget_spent_usd": round(spent_usd, 6),
        "rows_answered": len(ok_ids),
        "rows_recorded": recorded,
        "duplicate_rows": duplicates,
        "redis_budget_nanos": redis_nanos,
        "pg_budget_nanos": pg_nanos,
        "recovered_s": recovered,
        "fault_s": round(fault_ended - fault_started, 1),
    }
    checks = {
        "no_5xx_from_gateway_itself": not any(s in statuses for s in ("500",)),
        "answers_in_time": cell["longest_s"] <= UPSTREAM_TIMEOUT_S + 1,
        "rpm_within_limit": cell["rpm_admitted"] <= RPM_LIMIT,
        "budget_within_limit": spent_usd <= BUDGET_USD + 1e-9,
        "rows_all_recorded": recorded == len(ok_ids) and duplicates == 0,
        "redis_matches_rollups": redis_nanos is None or abs(redis_nanos - pg_nanos) <= 1000,
        "recovered": recovered is not None,
    }
    cell["checks"] = checks
    cell["pass"] = all(checks.values())
    log(f"{name}: {'PASS' if cell['pass'] else 'FAIL'} {json.dumps(cell)}")
    return cell


def table(cells):
    lines = [
        "| cell | answers by status | longest (s) | RPM admitted / 120 | budget spent / $0.50 | rows answered / recorded (dup) | Redis budget vs rollups (nano-USD) | recovered (s) | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        statuses = ", ".join(f"{k}: {v}" for k, v in c["statuses"].items())
        failed = [k for k, v in c["checks"].items() if not v]
        budget = "lost (re-seeded)" if c["redis_budget_nanos"] is None else f"{c['redis_budget_nanos']} vs {c['pg_budget_nanos']}"
        lines.append(
            f"| {c['cell']} | {statuses} | {c['longest_s']} | {c['rpm_admitted']} | ${c['budget_spent_usd']:.2f} | "
            f"{c['rows_answered']} / {c['rows_recorded']} ({c['duplicate_rows']}) | {budget} | {c['recovered_s']} | "
            f"{'pass' if c['pass'] else 'FAIL: ' + ', '.join(failed)} |")
    return "\n".join(lines)


def write_doc(cells):
    write_section("<!-- fault-matrix:start -->", "<!-- fault-matrix:end -->", table(cells))


def metric(port, name):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def soak(stack, seconds, warmup=60, every=10):
    """Half the measured capacity for `seconds`, keys created, revoked and rotated throughout;
    RSS, open file descriptors, key-cache size and p99 sampled every `every` seconds."""
    admin_ports = [int(g.env["TOLLGATE_ADMIN_LISTEN"].rsplit(":", 1)[1]) for g in stack.gateways]
    user = stack.api_call("POST", "/users", {"email": f"soak-{uuid.uuid4().hex[:8]}@example.com", "name": "soak"})
    stack.api_call("POST", "/subscriptions", {"user_id": user["id"], "model_id": "m"})
    new_key = lambda: stack.api_call("POST", "/keys", {"user_id": user["id"], "name": "soak", "models": ["m"]})
    keys = collections.deque(new_key() for _ in range(20))
    lock = threading.Lock()
    latencies = []
    statuses = collections.Counter()
    running = True

    def client(rate):
        i = 0
        next_at = time.time()
        while running:
            with lock:
                key = keys[i % len(keys)]["key"]
            status, _, took = chat(stack.gateways[i % 3].port, key)
            with lock:
                latencies.append((time.time(), took))
                statuses[str(status)] += 1
            i += 1
            next_at += 1 / rate
            time.sleep(max(0, next_at - time.time()))

    def churn():
        n = 0
        while running:
            time.sleep(1)
            n += 1
            made = new_key()
            with lock:
                keys.append(made)
                # As many revoked as created: the set of keys in use stays the same size.
                old = keys.popleft() if len(keys) > 20 else None
            if old:
                stack.api_call("POST", f"/keys/{old['id']}/revoke", {})
            if n % 5 == 0:
                with lock:
                    victim = keys[len(keys) // 2]
                rotated = stack.api_call("POST", f"/keys/{victim['id']}/rotate", {})
                with lock:
                    for k in keys:
                        if k["id"] == victim["id"]:
                            k["key"] = rotated.get("key", k["key"])

    # Capacity as this client measures it: 10 s flat out from 16 threads.
    log("measuring capacity")
    done_by = time.time() + 10
    counts = collections.Counter()

    def flat_out(n):
        while time.time() < done_by:
            if chat(stack.gateways[n % 3].port, keys[n % len(keys)]["key"])[0] == 200:
                counts[n] += 1

    workers = [threading.Thread(target=flat_out, args=(n,)) for n in range(16)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    capacity = sum(counts.values()) / 10
    rate = max(10, capacity / 2)
    log(f"capacity {capacity:.0f} req/s; soaking at {rate:.0f} req/s for {seconds} s")
    threads = [threading.Thread(target=client, args=(rate / 8,), daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=churn, daemon=True))
    for t in threads:
        t.start()
    samples = []
    started = time.time()
    while time.time() - started < seconds:
        time.sleep(every)
        now = time.time()
        with lock:
            recent = sorted(t for at, t in latencies if at > now - every)
        p99 = recent[int(len(recent) * 0.99) - 1] if recent else None
        sample = {"t": round(now - started), "p99_ms": round(p99 * 1000, 1) if p99 else None, "replicas": []}
        for g, admin in zip(stack.gateways, admin_ports):
            pid = g.proc.pid
            rss = int(next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")))
            sample["replicas"].append({"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")),
                                       "key_cache": metric(admin, "tollgate_gateway_key_cache_entries")})
        samples.append(sample)
        log(f"soak {json.dumps(sample)}")
    running = False
    after = [s for s in samples if s["t"] > warmup]
    # A trend, not noise: the last minute's average against the first minute's after warm-up,
    # within 10% plus a little for small counts (connections in flight, a few cache entries).
    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    def flat_series(series, slack):
        head, tail = series[:6], series[-6:]
        return not series or mean(tail) <= 1.1 * mean(head) + slack

    flat = {}
    for name, slack in (("rss_kb", 0), ("fds", 4), ("key_cache", 2)):
        flat[name] = all(flat_series([s["replicas"][r][name] or 0 for s in after], slack) for r in range(3))
    flat["p99_ms"] = flat_series([s["p99_ms"] for s in after if s["p99_ms"]], 1.0)
    return {"capacity_rps": round(capacity), "rate_rps": round(rate), "seconds": seconds, "statuses": dict(statuses),
            "samples": samples, "flat": flat}


def soak_table(result):
    lines = [
        f"Capacity as the load client measured it: {result['capacity_rps']} req/s; soaked at {result['rate_rps']} req/s "
        f"for {result['seconds']} s with a key created and another revoked every second and one rotated every 5 s. "
        f"Answers: {', '.join(f'{k}: {v}' for k, v in sorted(result['statuses'].items()))} (401: revoked or rotated keys "
        "still in the client's pool).",
        "",
        "| t (s) | p99 (ms) | RSS (MiB) per replica | open fds per replica | key-cache entries per replica |",
        "|---|---|---|---|---|",
    ]
    for s in result["samples"]:
        rss = " / ".join(f"{r['rss_kb'] / 1024:.1f}" for r in s["replicas"])
        fds = " / ".join(str(r["fds"]) for r in s["replicas"])
        cache = " / ".join(str(int(r["key_cache"] or 0)) for r in s["replicas"])
        lines.append(f"| {s['t']} | {s['p99_ms']} | {rss} | {fds} | {cache} |")
    verdict = ", ".join(f"{k}: {'flat' if v else 'NOT flat'}" for k, v in result["flat"].items())
    lines += ["", f"The last minute against the first after a minute of warm-up (averages; within 10%, "
              f"plus 4 descriptors, 2 cache entries or 1 ms): {verdict}."]
    return "\n".join(lines)


def write_section(start, end, body):
    doc = ROOT / "docs" / "reliability.md"
    text = doc.read_text()
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", help="comma-separated cells to run (default: all)")
    parser.add_argument("--soak", type=int, metavar="SECONDS", help="run the soak instead of the matrix (600: ten minutes)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/reliability.md")
    args = parser.parse_args()
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True)
    stack = Stack()
    if args.soak:
        try:
            result = soak(stack, args.soak)
        finally:
            stack.destroy()
        (STATE / "soak.json").write_text(json.dumps(result, indent=2))
        print(soak_table(result))
        if not args.no_doc:
            write_section("<!-- soak:start -->", "<!-- soak:end -->", soak_table(result))
        sys.exit(0 if all(result["flat"].values()) else 1)
    try:
        actions = fault_actions(stack)
        names = args.cells.split(",") if args.cells else list(actions)
        unknown = [n for n in names if n not in actions]
        if unknown:
            raise SystemExit(f"unknown cells {unknown}; known: {list(actions)}")
        cells = [run_cell(stack, n, actions[n]) for n in names]
    finally:
        stack.destroy()
    (STATE / "results.json").write_text(json.dumps(cells, indent=2))
    print(table(cells))
    if not args.no_doc:
        write_doc(cells)
    failed = [c["cell"] for c in cells if not c["pass"]]
    print(f"\n{len(cells) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
