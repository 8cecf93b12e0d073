"""Turns the benchmark's raw rows into medians, overheads and the tables of RESULTS.md.

Overhead = median(target) - median(direct) in the same scenario and run; the Baidu door's
scenario is compared with direct OpenAI calls at the same concurrency (the gateway turns a
Baidu request into an OpenAI one for the same upstream).

Adapted from summarize()/markdown() in ../shared/bench/bench.py.
"""

from __future__ import annotations

import statistics
from typing import Any

METRICS = ["rps", "p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms",
           "server_cpu_ms_per_req", "server_cpu_util", "server_rss_peak_mb",
           "client_cpu_util", "other_cpu_util", "mock_cpu_ms_per_req", "mock_cpu_util",
           "redis_cmds_per_req", "redis_roundtrips_per_req", "redis_cpu_ms_per_req",
           "sse_events_mean"]
OVERHEADS = ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms")

# issue 8's targets: (label, scenario (None: the whole run), metric, upper bound)
TARGETS = [
    ("added latency p50 at c=1 ≤ 1 ms", "nonstream-c1", "overhead_p50_ms", 1.0),
    ("added latency p99 at c=1 ≤ 3 ms", "nonstream-c1", "overhead_p99_ms", 3.0),
    ("streaming added TTFB p50 ≤ 1 ms (c=16)", "stream-c16", "overhead_ttfb_p50_ms", 1.0),
    ("streaming added TTFB p50 ≤ 1 ms (c=1: no queueing)", "stream-c1", "overhead_ttfb_p50_ms", 1.0),
    ("Redis round trips per request ≤ 2", "nonstream-c1", "redis_roundtrips_per_req", 2.0),
    ("peak RSS ≤ 120 MB per worker", None, "server_rss_peak_mb", 120.0),
]


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize(raw: list[dict[str, Any]], targets: list[str], scenarios: list[str]) -> list[dict[str, Any]]:
    summary = []
    for sc in scenarios:
        base = None
        for t in targets:
            rows = [r for r in raw if r["scenario"] == sc and r["target"] == t]
            if not rows:
                continue
            row: dict[str, Any] = {"scenario": sc, "target": t, "runs": len(rows),
                                   "errors": sum(r["errors"] for r in rows),
                                   "sent": sum(r["sent"] for r in rows),
                                   "upstream_requests": sum(r["upstream_requests"] for r in rows)}
            row.update({k: med(rows, k) for k in METRICS})
            cmds: dict[str, list[float]] = {}
            for r in rows:
                for name, n in (r.get("redis_cmds") or {}).items():
                    cmds.setdefault(name, []).append(n)
            if cmds:
                row["redis_cmds"] = {k: round(statistics.median(v), 3) for k, v in sorted(cmds.items())}
            if t == "direct":
                base = row
            elif base is not None:
                for k in OVERHEADS:
                    if row[k] is not None and base[k] is not None:
                        row["overhead_" + k] = round(row[k] - base[k], 3)
                row["rps_ratio"] = round(row["rps"] / base["rps"], 4) if base["rps"] else None
            summary.append(row)
    return summary


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def plus(v: Any) -> str:
    return "-" if v is None else ("+" if v >= 0 else "") + fmt(v)


def pct(v: Any) -> str:
    return "-" if v is None else f"{v * 100:.0f} %"


def headline(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["| scenario | target | req/s | p50 ms | p99 ms | added p50 | added p99 | TTFB p50 ms "
             "| added TTFB p50 | added TTFB p99 | CPU ms/req | peak RSS MB | Redis cmds/req "
             "| Redis round trips/req | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append("| " + " | ".join([
            r["scenario"], r["target"], fmt(r["rps"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]),
            plus(r.get("overhead_p50_ms")), plus(r.get("overhead_p99_ms")), fmt(r["ttfb_p50_ms"]),
            plus(r.get("overhead_ttfb_p50_ms")), plus(r.get("overhead_ttfb_p99_ms")),
            fmt(r["server_cpu_ms_per_req"]), fmt(r["server_rss_peak_mb"]),
            fmt(r["redis_cmds_per_req"]), fmt(r["redis_roundtrips_per_req"]), str(r["errors"])]) + " |")
    return lines


def harness(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["| scenario | target | requests sent | upstream saw | loadgen CPU (of its core) "
             "| mock CPU ms/upstream req | mock CPU (of its core) | target server CPU (of its core) "
             "| Redis CPU ms/req | other processes' CPU (cores) | p90 ms | SSE events/resp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append("| " + " | ".join([
            r["scenario"], r["target"], str(r["sent"]), str(r["upstream_requests"]),
            pct(r["client_cpu_util"]), fmt(r["mock_cpu_ms_per_req"]), pct(r["mock_cpu_util"]),
            pct(r["server_cpu_util"]), fmt(r["redis_cpu_ms_per_req"]), fmt(r["other_cpu_util"]), fmt(r["p90_ms"]),
            fmt(r["sse_events_mean"])]) + " |")
    return lines


def redis_breakdown(summary: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in summary if r.get("redis_cmds")]
    if not rows:
        return ["No target sent commands to Redis in this run."]
    lines = ["| scenario | target | commands per request (script-internal calls included) |",
             "|---|---|---|"]
    for r in rows:
        cmds = ", ".join(f"{k} {v:g}" for k, v in r["redis_cmds"].items())
        lines.append(f"| {r['scenario']} | {r['target']} | {cmds} |")
    return lines


def memory_table(memory: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| server | ready after start s | RSS idle after start MB | RSS peak under load MB "
             "| RSS idle after load MB |", "|---|---:|---:|---:|---:|"]
    for name, m in memory.items():
        lines.append(f"| {name} | {fmt(m.get('ready_s'))} | {fmt(m['idle_start'])} | {fmt(m['peak'])} "
                     f"| {fmt(m.get('idle_end'))} |")
    return lines


def targets_table(summary: list[dict[str, Any]], memory: dict[str, dict[str, Any]], ours: str,
                  litellm: str | None, portkey: str | None = None) -> list[str]:
    by = {(r["scenario"], r["target"]): r for r in summary}
    lines = ["| target (issue 8) | measured | met? |", "|---|---:|---|"]

    def verdict(v: float | None, bound: float) -> str:
        return "-" if v is None else ("yes" if v <= bound else "**no**")

    for label, sc, key, bound in TARGETS:
        if sc is None:
            v = memory.get(ours, {}).get("peak")
        else:
            v = (by.get((sc, ours)) or {}).get(key)
        lines.append(f"| {label} | {fmt(v)} | {verdict(v, bound)} |")
    for (sc, target), row in by.items():  # open-loop streaming runs, when the run has them
        if target == ours and sc.startswith("stream-r"):
            v = row.get("overhead_ttfb_p50_ms")
            lines.append(f"| streaming added TTFB p50 ≤ 1 ms (open loop, {sc[8:]} streams/s) | {fmt(v)} "
                         f"| {verdict(v, 1.0)} |")
    ours_rps = (by.get(("nonstream-c32", ours)) or {}).get("rps")
    for other, label, floor, absent in (
            (litellm, "LiteLLM", 20, "LiteLLM not in this run"),
            (portkey, "Portkey", 2.5, "Portkey not in this run (`--portkey`; ../shared/bench: ~690 req/s)")):
        rps = (by.get(("nonstream-c32", other)) or {}).get("rps") if other else None
        if ours_rps and rps:
            ratio = ours_rps / rps
            lines.append(f"| req/s at c=32 ≥ {floor:g}x {label}'s (same run) | {ratio:.1f}x "
                         f"({fmt(ours_rps)} / {fmt(rps)}) | {'yes' if ratio >= floor else '**no**'} |")
        else:
            lines.append(f"| req/s at c=32 ≥ {floor:g}x {label}'s (same run) | {absent} | - |")
    return lines
