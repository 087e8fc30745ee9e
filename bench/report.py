"""Turns one bench/run's raw measurements into bench/results/<time>-<commit>.{json,md} and the
latest table in bench/README.md. Standard library only.

usage: report.py WORKDIR QUICK SECONDS_PER_CASE REPEATS
"""

import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

work, quick, seconds, repeats = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
TARGETS = ["mock", "bare", "gateway", "litellm"]
# near_limit: the gateway only (c=32 on a key whose rpm is half of what c=32 served: about half 429s).
CASES = ["c1", "c32", "c128", "rate2000", "near_limit"]
# Counters read from the gateway before and after each of its cases (bench/run's gw_probe): the
# Prometheus names summed over their labels, and the context switches of its threads.
PROBES = {
    "redis_round_trips_per_request": "tollgate_gateway_redis_round_trips_total",
    "lease_admissions_per_request": "tollgate_gateway_lease_admissions_total",
    "wakeups_per_request": "bench_ctxt_switches",
}
PROBE_SPECS = {"redis_round_trips_per_request": "{:.3f}", "lease_admissions_per_request": "{:.3f}", "wakeups_per_request": "{:.2f}"}


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def oha_runs(target, case):
    """The case's oha results, each with the stem of its files (TARGET.CASE.I) in "_stem"."""
    runs = []
    for path in sorted(glob.glob(os.path.join(work, f"{target}.{case}.*.json"))):
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(run, dict):
            run["_stem"] = path[: -len(".json")]
            runs.append(run)
    return runs


def read_probe(path):
    """A counters file (Prometheus text): {name: value summed over label sets}, None if absent."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        try:
            value = float(line.rsplit(None, 1)[-1])
        except ValueError:
            continue
        values[name] = values.get(name, 0.0) + value
    return values


def per_request(stem, requests):
    """Each PROBES figure for one measurement: the counter's delta over its requests (None when
    the counter, a probe file or the request count is missing)."""
    before, after = read_probe(stem + ".before.txt"), read_probe(stem + ".after.txt")
    out = {}
    for field, name in PROBES.items():
        if before is None or after is None or name not in before or name not in after or not requests:
            out[field] = None
        else:
            out[field] = (after[name] - before[name]) / requests
    return out


def figure(runs, pick):
    return spread([pick(r) for r in runs])


def rps(r):
    return r.get("summary", {}).get("requestsPerSec")


def pct(name):
    def pick(r):
        v = (r.get("latencyPercentiles") or {}).get(name)
        return None if v is None else v * 1000.0
    return pick


def ok_rate(r):
    return r.get("summary", {}).get("successRate")


def sent(r):
    """Requests oha sent: every answer and every error (the count behind requestsPerSec)."""
    dist, errors = r.get("statusCodeDistribution"), r.get("errorDistribution")
    if isinstance(dist, dict):
        return sum(dist.values()) + (sum(errors.values()) if isinstance(errors, dict) else 0)
    s = r.get("summary") or {}
    if s.get("requestsPerSec") is not None and s.get("total") is not None:
        return round(s["requestsPerSec"] * s["total"])
    return None


def share_429(r):
    dist = r.get("statusCodeDistribution")
    if not isinstance(dist, dict) or not sum(dist.values()):
        return None
    return dist.get("429", 0) / sum(dist.values())


results = {}
for target in TARGETS:
    cases = {}
    for case in CASES:
        runs = oha_runs(target, case)
        if runs:
            cases[case] = {
                "rps": figure(runs, rps),
                "p50_ms": figure(runs, pct("p50")),
                "p99_ms": figure(runs, pct("p99")),
                "success_rate": figure(runs, ok_rate),
                "requests": figure(runs, sent),
                "share_429": figure(runs, share_429),
            }
            if target == "gateway":
                probes = [per_request(r["_stem"], sent(r)) for r in runs]
                for field in PROBES:
                    cases[case][field] = spread([p[field] for p in probes])
    ttfb_path = os.path.join(work, f"{target}.ttfb.txt")
    if os.path.exists(ttfb_path):
        with open(ttfb_path) as f:
            samples = sorted(float(x) * 1000.0 for x in f if x.strip())
        if samples:
            cases["ttfb"] = {
                "p50_ms": statistics.median(samples),
                "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                "samples": len(samples),
            }
            if target == "gateway":
                probe = per_request(os.path.join(work, "gateway.ttfb"), len(samples))
                for field in PROBES:
                    cases["ttfb"][field] = probe[field]
    if cases:
        results[target] = cases


def med(target, case, field):
    try:
        v = results[target][case][field]
        return v["median"] if isinstance(v, dict) else v
    except (KeyError, TypeError):
        return None


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


rss = load("gateway.rss.json")
usage = load("usage_writer.json")
near = load("near_limit.json")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
with open("/proc/meminfo") as f:
    mem_kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
now = datetime.datetime.now(datetime.timezone.utc)

def added(case, field, scale=1.0):
    """How much the gateway adds over bare pingora for one figure (None when either is missing)."""
    g, b = med("gateway", case, field), med("bare", case, field)
    return None if g is None or b is None else (g - b) * scale


added_p50_us = added("c1", "p50_ms", 1000.0)
added_p99_ms = added("rate2000", "p99_ms")
added_ttfb_ms = added("ttfb", "p50_ms")

targets = [
    ("added p50 over bare pingora at c=1", added_p50_us, "<= 100 us", lambda v: v <= 100, "{:.0f} us"),
    ("added p99 at 2,000 RPS", added_p99_ms, "<= 1 ms", lambda v: v <= 1.0, "{:.2f} ms"),
    ("throughput vs bare pingora at c=32", ratio(med("gateway", "c32", "rps"), med("bare", "c32", "rps")), ">= 0.6x", lambda v: v >= 0.6, "{:.2f}x"),
    ("throughput vs LiteLLM at c=32", ratio(med("gateway", "c32", "rps"), med("litellm", "c32", "rps")), ">= 100x", lambda v: v >= 100, "{:.0f}x"),
    ("streaming TTFB added", added_ttfb_ms, "<= 1 ms", lambda v: v <= 1.0, "{:.2f} ms"),
    (f"RSS with {rss['keys'] if rss else '?'} keys cached", (rss["rss_kb"] / 1024.0) if rss else None, "<= 150 MB (100k keys)", lambda v: v <= 150, "{:.0f} MB"),
    ("usage writer", usage["rows_per_second"] if usage else None, ">= 20,000 rows/s", lambda v: v >= 20000, "{:,.0f} rows/s"),
    ("near-limit throughput vs far-from-limit at c=32", ratio(med("gateway", "near_limit", "rps"), med("gateway", "c32", "rps")), ">= 0.5x (within 2x)", lambda v: v >= 0.5, "{:.2f}x"),
]

report = {
    "date": now.isoformat(timespec="seconds"),
    "commit": commit,
    "machine": {"cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1), "cpu": cpu},
    "mode": "quick" if quick else "full",
    "seconds_per_case": seconds,
    "repeats": repeats,
    "results": results,
    "gateway_rss": rss,
    "usage_writer": usage,
    "near_limit": near,
    "targets": [{"figure": n, "value": v, "target": t, "met": None if v is None else bool(ok(v))} for n, v, t, ok, _ in targets],
}


def fmt(v, spec="{:.2f}"):
    return "n/a" if v is None else spec.format(v)


def cell(target, case, field, spec):
    v = results.get(target, {}).get(case, {}).get(field)
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        if v["runs"] > 1:
            return f"{spec.format(v['median'])} ({spec.format(v['min'])}-{spec.format(v['max'])})"
        return spec.format(v["median"])
    return spec.format(v)


rows = [
    ("c=1 p50 latency (ms)", "c1", "p50_ms", "{:.3f}"),
    ("c=1 p99 latency (ms)", "c1", "p99_ms", "{:.3f}"),
    ("c=32 throughput (req/s)", "c32", "rps", "{:.0f}"),
    ("c=32 p50 (ms)", "c32", "p50_ms", "{:.2f}"),
    ("c=32 p99 (ms)", "c32", "p99_ms", "{:.2f}"),
    ("c=128 throughput (req/s)", "c128", "rps", "{:.0f}"),
    ("c=128 p50 (ms)", "c128", "p50_ms", "{:.2f}"),
    ("c=128 p99 (ms)", "c128", "p99_ms", "{:.2f}"),
    ("2,000 req/s: achieved (req/s)", "rate2000", "rps", "{:.0f}"),
    ("2,000 req/s: p50 (ms)", "rate2000", "p50_ms", "{:.3f}"),
    ("2,000 req/s: p99 (ms)", "rate2000", "p99_ms", "{:.3f}"),
    ("near the limit, c=32: throughput, 200s and 429s (req/s)", "near_limit", "rps", "{:.0f}"),
    ("near the limit, c=32: p50 (ms)", "near_limit", "p50_ms", "{:.2f}"),
    ("near the limit, c=32: p99 (ms)", "near_limit", "p99_ms", "{:.2f}"),
    ("near the limit, c=32: share of 429 answers", "near_limit", "share_429", "{:.1%}"),
    ("streaming TTFB p50 (ms)", "ttfb", "p50_ms", "{:.3f}"),
    ("streaming TTFB p99 (ms)", "ttfb", "p99_ms", "{:.3f}"),
]
present = [t for t in TARGETS if t in results]
lines = [
    f"Run {report['date']} at commit `{commit}`, {report['mode']} mode ({seconds} s per case, {repeats} repeat(s); "
    f"median, with min-max when repeated), on {report['machine']['cores']} cores, {report['machine']['memory_gb']} GB ({cpu}).",
    "",
    "| figure | " + " | ".join(present) + " | gateway / bare | gateway / LiteLLM |",
    "|---" * (len(present) + 3) + "|",
]
for label, case, field, spec in rows:
    g_b = ratio(med("gateway", case, field), med("bare", case, field))
    g_l = ratio(med("gateway", case, field), med("litellm", case, field))
    lines.append(f"| {label} | " + " | ".join(cell(t, case, field, spec) for t in present) + f" | {fmt(g_b)} | {fmt(g_l)} |")
if "litellm" not in results:
    lines += ["", "LiteLLM: not measured in this run (it could not be installed or started, or was skipped)."]
if near:
    lines += ["", f"Near the limit: the key's rpm is {near['rpm']:,}, half of the {near['far_requests']:,} requests the "
              f"c=32 case served in {seconds} s (a fresh key each repeat)."]
gw_cases = [
    ("c=1", "c1"),
    ("c=32", "c32"),
    ("c=128", "c128"),
    ("2,000 req/s", "rate2000"),
    ("near the limit, c=32", "near_limit"),
    ("streaming (curl, sequential)", "ttfb"),
]
if "gateway" in results:
    lines += [
        "",
        "| gateway case | requests | Redis round trips / request | lease admissions / request | wake-ups / request |",
        "|---|---|---|---|---|",
    ]
    for label, case in gw_cases:
        if case not in results["gateway"]:
            continue
        count = "requests" if case != "ttfb" else "samples"
        lines.append(
            f"| {label} | {cell('gateway', case, count, '{:.0f}')} | "
            + " | ".join(cell("gateway", case, field, PROBE_SPECS[field]) for field in PROBES)
            + " |"
        )
lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
for name, value, goal, ok, spec in targets:
    met = "n/a" if value is None else ("yes" if ok(value) else "no")
    lines.append(f"| {name} | {fmt(value, spec)} | {goal} | {met} |")
table = "\n".join(lines) + "\n"

stamp = now.strftime("%Y%m%dT%H%M%SZ")
os.makedirs("bench/results", exist_ok=True)
with open(f"bench/results/{stamp}-{commit}.json", "w") as f:
    json.dump(report, f, indent=2)
with open(f"bench/results/{stamp}-{commit}.md", "w") as f:
    f.write(table)
readme = "bench/README.md"
if os.path.exists(readme):
    text = open(readme).read()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        with open(readme, "w") as f:
            f.write(head + start + "\n" + table + end + tail)
print(table)
print(f"written: bench/results/{stamp}-{commit}.json and .md")
