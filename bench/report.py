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
CASES = ["c1", "c32", "c128", "rate2000"]


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def oha_runs(target, case):
    runs = []
    for path in sorted(glob.glob(os.path.join(work, f"{target}.{case}.*.json"))):
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            pass
    return runs


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
            }
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
