#!/usr/bin/env python3
"""Benchmark llm-gateway against calling the upstream directly, in the same run.

    python bench/run.py [--quick] [--litellm] [--portkey]

Starts the fast mock upstream (mock_upstream.py), a private redis-server, the gateway
(run_gateway.sh: 1 worker, Redis store, a key with limits and a quota, usage accounting on,
cache off), with --litellm LiteLLM proxy (installed on first use into bench/.venvs/litellm)
and with --portkey the open-source Portkey gateway (npm-installed on first use into
bench/.venvs/portkey). Then runs loadgen.py for every scenario x target x repeat, the
targets interleaved so that drift hits them alike, and measures per run: req/s, latency and
TTFB percentiles, the target server's CPU per request and peak RSS, Redis commands and round
trips per request (INFO deltas), and the harness's own load (loadgen and mock CPU).
Writes raw.jsonl / summary.json / summary.md to bench/out/<time>/ and the tables, with the
exact command, into bench/RESULTS.md (between its generated-section markers).
Stops everything it started on exit.

Orchestration adapted from ../shared/bench/bench.py (the project's reference harness).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from procs import Sampler, Server, cpu_s, free_port, parse_cpus, port_in_use, rss_mb, system_busy_s  # noqa: E402

LITELLM_VERSION = "1.106.2"
LITELLM_PACKAGES = [f"litellm[proxy]=={LITELLM_VERSION}", "opentelemetry-sdk==1.45.2", "prisma==0.15.0",
                    "httptools"]
PORTKEY_VERSION = "1.15.2"
# The dependency versions from Portkey's own package-lock.json (tag v1.15.2): without them npm
# resolves @hono/node-server to 1.19.x and every stream fails (../shared/bench pitfall 11).
PORTKEY_PINS = {"@hono/node-server": "1.13.5", "@hono/node-ws": "1.2.0", "hono": "4.9.7"}
PORTKEY_PACKAGES = [f"@portkey-ai/gateway@{PORTKEY_VERSION}", *(f"{k}@{v}" for k, v in PORTKEY_PINS.items())]
# Portkey routes per request (no server-side model list); $UPSTREAM_BASE is the mock's /v1 base.
PORTKEY_HEADERS = ["x-portkey-provider: openai", "x-portkey-custom-host: $UPSTREAM_BASE"]
BAIDU_PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/mock_gpt"
BEGIN, END = "<!-- bench:begin (written by bench/run.py) -->", "<!-- bench:end -->"
DEFAULT_SCENARIOS = "nonstream-c1,nonstream-c32,stream-c1,stream-c16,baidu-c32"


# ---------- scenarios and targets ----------

OPEN_LOOP_CONNECTIONS = 64  # the most connections an open-loop (-rN) scenario may open


def parse_scenario(s: str) -> dict[str, Any]:
    """nonstream-c32: 32 clients back to back (closed loop); stream-r2000: 2,000 requests
    per second on a fixed schedule (open loop), whatever the answers do."""
    m = re.fullmatch(r"(baidu-)?(non)?(stream-)?([cr])(\d+)", s)
    if not m or (not m.group(1) and not m.group(3)) or int(m.group(5)) < 1:
        sys.exit(f"bad scenario {s!r}: use nonstream-cN, stream-cN, baidu-cN or baidu-stream-cN "
                 "(or -rN instead of -cN: N requests/s, open loop)")
    baidu = m.group(1) is not None
    stream = m.group(3) is not None and m.group(2) is None
    rate = int(m.group(5)) if m.group(4) == "r" else 0
    return {"name": s, "dialect": "baidu" if baidu else "openai", "stream": stream,
            "concurrency": OPEN_LOOP_CONNECTIONS if rate else int(m.group(5)), "rate": rate}


class Target:
    def __init__(self, name: str, base: str, server: Server, headers: list[str] | None = None,
                 baidu_token: str | None = None, redis_url: str | None = None) -> None:
        self.name, self.base, self.server = name, base.rstrip("/"), server
        self.headers = headers or []
        self.baidu_token = baidu_token
        self.redis_url = redis_url
        self.ready_s = 0.0

    def supports(self, sc: dict[str, Any]) -> bool:
        # direct answers the Baidu scenarios with the OpenAI calls the gateway makes for them
        return sc["dialect"] == "openai" or self.name == "direct" or self.baidu_token is not None

    def loadgen_args(self, sc: dict[str, Any]) -> list[str]:
        if sc["dialect"] == "baidu" and self.name != "direct":
            query = urllib.parse.urlencode({"access_token": self.baidu_token})
            return ["--url", f"{self.base}{BAIDU_PATH}?{query}", "--dialect", "baidu"]
        return ["--url", self.base + "/v1/chat/completions"]


# ---------- http helpers ----------

def chat_ok(base: str, args: argparse.Namespace, headers: Sequence[str] = (), timeout: float = 5) -> bool:
    extra = {k.strip(): v.strip() for k, _, v in (h.partition(":") for h in headers)}
    req = urllib.request.Request(
        base + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": args.model, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "ping"}]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}", **extra})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200 and b"choices" in r.read()
    except OSError:
        return False


def wait_ready(server: Server, base: str, args: argparse.Namespace, limit: float,
               headers: Sequence[str] = ()) -> float:
    t0 = time.time()
    while time.time() - t0 < limit:
        if not server.alive():
            sys.exit(f"{server.name} exited during start-up; see {args.out}/{server.name}.log")
        if chat_ok(base, args, headers):
            return round(time.time() - t0, 1)
        time.sleep(0.25)
    sys.exit(f"{server.name} not ready after {limit}s; see {args.out}/{server.name}.log")


def post_json(url: str, body: bytes = b"", timeout: float = 5) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method="POST", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def baidu_token(base: str, args: argparse.Namespace) -> str | None:
    """An access token for the gateway's Baidu door (AK = the key's name or the key, SK = the
    key), checked with one chat call; None when the gateway has no working Baidu door."""
    for client_id in ("bench", args.api_key):
        query = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                        "client_secret": args.api_key})
        status, body = post_json(f"{base}/oauth/2.0/token?{query}")
        token = body.get("access_token") if status == 200 else None
        if not token:
            continue
        chat = json.dumps({"messages": [{"role": "user", "content": "ping"}]}).encode()
        status, answer = post_json(f"{base}{BAIDU_PATH}?" + urllib.parse.urlencode({"access_token": token}), chat)
        if status == 200 and "result" in answer and "error_code" not in answer:
            return str(token)
        print(f"baidu door: token accepted but chat answered {status} "
              f"{str(answer.get('error_msg') or answer)[:120]}", file=sys.stderr)
        return None
    return None


def mock_requests(mock_base: str) -> int:
    with urllib.request.urlopen(mock_base + "/stats", timeout=5) as r:
        return int(json.load(r)["requests"])


# ---------- redis ----------

def start_redis(args: argparse.Namespace) -> tuple[Server, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found: apt-get install redis-server (or brew install redis)")
    port = free_port()
    rdir = args.out / "redis"
    rdir.mkdir(exist_ok=True)
    srv = Server("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(rdir)],
                 args.out / "redis.log", cwd=HERE, cpus=args.client_cpus if args.pin else None)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    for _ in range(100):
        try:
            client.ping()
            return srv, url
        except redis.RedisError:
            time.sleep(0.1)
    sys.exit("redis-server did not start")


_clients: dict[str, redis.Redis] = {}


def redis_snapshot(url: str) -> dict[str, Any]:
    """Command counts (script-internal calls included) and read events, by one INFO call on a
    connection kept open (so that no connection set-up lands between two snapshots); the
    INFO's own command and read are taken out again by redis_delta."""
    client = _clients.setdefault(url, redis.Redis.from_url(url, socket_timeout=5))
    info = client.execute_command("INFO", "commandstats", "stats")
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k.startswith("cmdstat_")}
    return {"calls": calls, "reads": info["total_reads_processed"]}


def redis_delta(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, int], int]:
    calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()}
    calls["info"] = calls.get("info", 0) - 1
    calls = {k: v for k, v in calls.items() if v > 0 and k not in ("info", "hello", "client|setinfo")}
    return calls, b["reads"] - a["reads"] - 1


# ---------- litellm ----------

def ensure_litellm(args: argparse.Namespace) -> Path:
    venv = HERE / ".venvs" / "litellm"
    exe = venv / "bin" / "litellm"
    marker = venv / ".bench-installed"
    if exe.exists() and marker.exists() and marker.read_text().strip() == " ".join(LITELLM_PACKAGES):
        return exe
    print(f"installing LiteLLM {LITELLM_VERSION} into {venv} (a few minutes, once) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([args.venv_python, "-m", "venv", str(venv)], check=True)
    log = args.out / "litellm-install.log"
    with open(log, "wb") as f:
        r = subprocess.run([str(venv / "bin" / "pip"), "install", *LITELLM_PACKAGES], stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0 or not exe.exists():
        sys.exit(f"LiteLLM install failed; see {log}")
    marker.write_text(" ".join(LITELLM_PACKAGES) + "\n")
    return exe


# ---------- portkey ----------

def check_portkey_tree(folder: Path) -> str | None:
    """None when `npm ls @hono/node-server hono` shows one copy of each, the pinned version, at the
    top of node_modules; else what is wrong (a nested or other copy brings pitfall 11 back)."""
    checked = sorted({"@hono/node-server", "hono"})
    r = subprocess.run(["npm", "ls", "--parseable", "--long", *checked], cwd=folder, capture_output=True, text=True)
    copies = []  # (name, version, physical path): one line per copy on disk, deduped ones not repeated
    for line in r.stdout.splitlines():
        path, _, spec = line.partition(":")
        name, _, version = spec.split(":", 1)[0].rpartition("@")
        if name in checked:
            copies.append((name, version, Path(path)))
    problems = [f"{n}@{v} at {p}" for n, v, p in copies
                if v != PORTKEY_PINS[n] or p != folder / "node_modules" / n]
    problems += [f"{n} missing" for n in checked if n not in {c[0] for c in copies}]
    if r.returncode != 0 or problems:
        return ("; ".join(problems) or f"`npm ls` failed: {(r.stderr or r.stdout)[-500:]}") + (
            " (streaming breaks unless the only copies are "
            + ", ".join(f"{n}@{PORTKEY_PINS[n]}" for n in checked) + " at the top of node_modules)")
    return None


def ensure_portkey(args: argparse.Namespace) -> Path:
    folder = HERE / ".venvs" / "portkey"
    entry = folder / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    marker = folder / ".bench-installed"
    if entry.exists() and marker.exists() and marker.read_text().strip() == " ".join(PORTKEY_PACKAGES):
        return folder
    if not shutil.which("node") or not shutil.which("npm"):
        sys.exit("--portkey needs node (20) and npm on PATH")
    print(f"installing Portkey gateway {PORTKEY_VERSION} into {folder} (npm, once) ...", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    log = args.out / "portkey-install.log"
    with open(log, "wb") as f:
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *PORTKEY_PACKAGES], cwd=folder,
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not entry.exists():
        sys.exit(f"Portkey install failed; see {log}")
    problem = check_portkey_tree(folder)
    if problem:
        sys.exit(f"Portkey install in {folder} is not the pinned tree: {problem}; "
                 f"delete {folder} and retry (install log: {log})")
    marker.write_text(" ".join(PORTKEY_PACKAGES) + "\n")
    return folder


# ---------- one measured run ----------

def run_loadgen(args: argparse.Namespace, t: Target, sc: dict[str, Any], mock: Server) -> dict[str, Any]:
    cmd = [args.python, str(HERE / "loadgen.py"), "--json", *t.loadgen_args(sc),
           "-c", str(sc["concurrency"]), "-d", str(args.duration), "-w", str(args.warmup),
           "--model", args.model, "--api-key", args.api_key]
    if sc["stream"]:
        cmd.append("--stream")
    if sc["rate"]:
        cmd += ["--rate", str(sc["rate"])]
    for h in t.headers:
        cmd += ["-H", h]
    if args.pin:
        cmd = ["taskset", "-c", args.client_cpus, *cmd]
    sampler = Sampler(t.server.pid)
    up0, cpu0, mock0 = mock_requests(args.mock_base), cpu_s(t.server.pid), cpu_s(mock.pid)
    rs0 = redis_snapshot(t.redis_url) if t.redis_url else None
    rcpu0 = cpu_s(args.redis_pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0, busy0 = sum(os.times()[:2]), system_busy_s()
    wall0 = time.monotonic()
    sampler.start()
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True,
                         timeout=args.warmup + args.duration + 120)
    peak = sampler.stop()
    wall = time.monotonic() - wall0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, mock1, up1 = cpu_s(t.server.pid), cpu_s(mock.pid), mock_requests(args.mock_base)
    rcpu1 = cpu_s(args.redis_pid)
    self1, busy1 = sum(os.times()[:2]), system_busy_s()
    rs1 = redis_snapshot(t.redis_url) if t.redis_url else None
    if out.returncode != 0:
        sys.exit(f"loadgen failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout)
    res["url"] = re.sub(r"access_token=[^&]+", "access_token=***", res["url"])
    sent = max(1, res["sent"])
    upstream = up1 - up0
    client = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    ours = (cpu1 - cpu0) + (0 if t.server is mock else mock1 - mock0) + (rcpu1 - rcpu0) + client + (self1 - self0)
    res.update(target=t.name, scenario=sc["name"], server_rss_peak_mb=peak, upstream_requests=upstream,
               wall_s=round(wall, 2),
               server_cpu_ms_per_req=round((cpu1 - cpu0) * 1000 / sent, 3),
               server_cpu_util=round((cpu1 - cpu0) / wall, 3),
               client_cpu_util=round(client / wall, 3),
               other_cpu_util=round(max(0.0, busy1 - busy0 - ours) / wall, 3),
               mock_cpu_ms_per_req=round((mock1 - mock0) * 1000 / max(1, upstream), 4),
               mock_cpu_util=round((mock1 - mock0) / wall, 3))
    if rs0 is not None and rs1 is not None:
        calls, reads = redis_delta(rs0, rs1)
        res.update(redis_cmds={k: round(v / sent, 3) for k, v in calls.items()},
                   redis_cmds_per_req=round(sum(calls.values()) / sent, 3),
                   redis_roundtrips_per_req=round(reads / sent, 3),
                   redis_cpu_ms_per_req=round((rcpu1 - rcpu0) * 1000 / sent, 4))
    return res


# ---------- results ----------

def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "adapters"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in gateway/ or adapters/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_markdown(args: argparse.Namespace, summary: list[dict[str, Any]], memory: dict[str, Any],
                     meta: dict[str, Any], notes: list[str]) -> str:
    ours = "llm-gateway"
    lines = [BEGIN, "", f"## Latest run: {meta['date']}", "",
             "Command (from the repository root):", "", "```sh", meta["command"], "```", "",
             f"- {meta['windows']}", f"- machine: {meta['cpus']} x {meta['cpu_model']}, Python {meta['python']}; "
             f"pinning: {meta['pinning']}", f"- gateway code: {meta['git']}",
             f"- targets: {', '.join(meta['targets'])}", *[f"- {n}" for n in notes], "",
             "### Results (medians over repeats; added = target - direct in the same scenario)", "",
             *report.headline(summary), "",
             "### Against issue 8's targets", "",
             *report.targets_table(summary, memory, ours, "litellm" if "litellm" in meta["targets"] else None,
                                   "portkey" if "portkey" in meta["targets"] else None),
             "", "### Memory", "", *report.memory_table(memory), "",
             "### The harness's own numbers (is the client or the upstream the bottleneck?)", "",
             "CPU shares are of one core over the whole run (warm-up included). The loadgen and the "
             "mock share the client core; the direct rows show what that pair can do without a gateway.",
             "", *report.harness(summary), "",
             "### Redis commands per request (ours)", "", *report.redis_breakdown(summary), "",
             "Round trips are Redis read events (INFO `total_reads_processed`) per request: a "
             "pipeline or a script is one; commands include the calls a Lua script makes.", "", END]
    return "\n".join(lines) + "\n"


def write_results(path: Path, generated: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + generated.rstrip("\n") + tail
    else:
        text = ("# Benchmark results\n\nWritten by `bench/run.py` (see bench/README.md). The section "
                "between the markers is replaced on every run; text outside them is kept.\n\n"
                + generated + old)
    path.write_text(text)


# ---------- main ----------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat of 5 s windows after 2 s warm-up")
    p.add_argument("--litellm", action="store_true",
                   help=f"also measure LiteLLM proxy {LITELLM_VERSION} (installed into bench/.venvs on first use)")
    p.add_argument("--portkey", action="store_true",
                   help=f"also measure the open-source Portkey gateway {PORTKEY_VERSION} (npm-installed into "
                        "bench/.venvs on first use)")
    p.add_argument("--gateway", nargs=3, action="append", default=[], metavar=("NAME", "URL", "CMD"),
                   help="another gateway: name, loopback base URL, start command (run in bench/ with PORT and "
                        "UPSTREAM_BASE set)")
    p.add_argument("--header", nargs=2, action="append", default=[], metavar=("NAME", "'KEY: VALUE'"),
                   help="extra request header for gateway NAME ($UPSTREAM_BASE etc. expanded)")
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help="comma-separated: nonstream-cN, stream-cN, baidu-cN, baidu-stream-cN")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run; default 15 (--quick: 5)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per run; default 3 (--quick: 2)")
    p.add_argument("--port", type=int, default=4500, help="our gateway's port")
    p.add_argument("--litellm-port", type=int, default=4400)
    p.add_argument("--portkey-port", type=int, default=4410)
    p.add_argument("--mock-port", type=int, default=9000)
    p.add_argument("--mock-args", default="--chunks 20", help="extra mock_upstream.py arguments")
    p.add_argument("--client-cpus", default="0", help="cpus for mock + loadgen + Redis + this script")
    p.add_argument("--gateway-cpus", default="1", help="cpus for the gateway under test")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--model", default="mock-gpt")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--python", default=sys.executable, help="interpreter for mock and loadgen")
    p.add_argument("--venv-python", default=sys.executable, help="interpreter that creates the LiteLLM venv")
    p.add_argument("--ready-timeout", type=float, default=180)
    p.add_argument("--out", default=None, help="raw results folder (default bench/out/<time>)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="'' to leave RESULTS.md alone")
    args = p.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration = args.duration or (5.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    if args.pin and not shutil.which("taskset"):
        print("taskset not found: running unpinned", file=sys.stderr)
        args.pin = False
    args.out = Path(args.out or HERE / "out" / time.strftime("%Y%m%d-%H%M%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.mock_base = f"http://127.0.0.1:{args.mock_port}"
    return args


def main() -> None:
    args = parse_args()
    scenarios = [parse_scenario(s) for s in args.scenarios.split(",")]
    gateways = [("llm-gateway", f"http://127.0.0.1:{args.port}", "./run_gateway.sh")]
    if args.litellm:
        exe = ensure_litellm(args)
        gateways.append(("litellm", f"http://127.0.0.1:{args.litellm_port}", f"env LITELLM={exe} ./run_litellm.sh"))
    if args.portkey:
        folder = ensure_portkey(args)
        gateways.append(("portkey", f"http://127.0.0.1:{args.portkey_port}",
                         f"env PORTKEY_DIR={shlex.quote(str(folder))} ./run_portkey.sh"))
        given = {h.partition(":")[0].strip().lower() for n, h in args.header if n == "portkey"}
        args.header += [["portkey", h] for h in PORTKEY_HEADERS if h.partition(":")[0].lower() not in given]
    gateways += [tuple(g) for g in args.gateway]
    names = [g[0] for g in gateways]
    if len(set(names)) != len(names):
        sys.exit(f"gateway names must be distinct: {names}")
    for _name, url, _ in gateways:
        if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
            sys.exit(f"gateway URL must be loopback: {url}")
    for url in [args.mock_base] + [g[1] for g in gateways]:
        if port_in_use(url):
            sys.exit(f"{url} already answers: stop whatever listens there first")
    if args.pin:  # keep this script off the gateway's cpus too
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))

    servers: list[Server] = []
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        redis_srv, redis_url = start_redis(args)
        servers.append(redis_srv)
        args.redis_pid = redis_srv.pid
        cpus = args.client_cpus if args.pin else None
        mock = Server("mock", [args.python, str(HERE / "mock_upstream.py"), "--port", str(args.mock_port),
                               *shlex.split(args.mock_args)], args.out / "mock.log", cwd=HERE, cpus=cpus)
        servers.append(mock)
        targets = [Target("direct", args.mock_base, mock)]
        targets[0].ready_s = wait_ready(mock, args.mock_base, args, 15)
        for name, url, cmd in gateways:
            env = dict(os.environ, PORT=str(urllib.parse.urlsplit(url).port), UPSTREAM_BASE=args.mock_base + "/v1")
            if name == "llm-gateway":
                env.update(REDIS_URL=redis_url, BENCH_CONFIG_DIR=str(args.out / "gateway-config"))
            headers = [string.Template(h).safe_substitute(env) for n, h in args.header if n == name]
            srv = Server(name, shlex.split(os.path.expandvars(cmd)), args.out / f"{name}.log", cwd=HERE,
                         env=env, cpus=args.gateway_cpus if args.pin else None)
            servers.append(srv)
            t = Target(name, url, srv, headers, redis_url=redis_url if name == "llm-gateway" else None)
            t.ready_s = wait_ready(srv, t.base, args, args.ready_timeout, headers)
            targets.append(t)
        notes = []
        ours = targets[1]
        if any(sc["dialect"] == "baidu" for sc in scenarios):
            ours.baidu_token = baidu_token(ours.base, args)
            if ours.baidu_token is None:
                skipped = [sc["name"] for sc in scenarios if sc["dialect"] == "baidu"]
                scenarios = [sc for sc in scenarios if sc["dialect"] != "baidu"]
                notes.append(f"Baidu door: not available in this build (no working /oauth/2.0/token + "
                             f"{BAIDU_PATH}); skipped {', '.join(skipped)}")
                print(notes[-1], flush=True)
        for t in targets[2:]:  # other gateways have no Baidu door (none is set up for them)
            skipped = [sc["name"] for sc in scenarios if not t.supports(sc)]
            if skipped:
                notes.append(f"{t.name}: no Baidu door; skipped {', '.join(skipped)} for it")
                print(notes[-1], flush=True)
        if args.litellm:
            notes.append(f"LiteLLM: litellm[proxy]=={LITELLM_VERSION} + opentelemetry-sdk + prisma, 1 uvicorn worker")
        if args.portkey:
            node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
            notes.append(f"Portkey: @portkey-ai/gateway {PORTKEY_VERSION} with "
                         + ", ".join(f"{k}@{v}" for k, v in PORTKEY_PINS.items())
                         + f", one Node {node} process, --headless (no auth of its own; a fixed 25 ms "
                           "sleep before each stream's first chunk, ../shared/bench pitfall 15)")
        time.sleep(3)
        memory = {t.name: {"idle_start": rss_mb(t.server.pid), "peak": 0.0, "ready_s": t.ready_s}
                  for t in targets}
        print("ready: " + ", ".join(f"{t.name} in {t.ready_s}s (RSS {memory[t.name]['idle_start']} MB)"
                                     for t in targets), flush=True)

        raw = []
        with open(args.out / "raw.jsonl", "w") as f:
            for rep in range(args.repeats):
                for sc in scenarios:
                    order = targets if rep % 2 == 0 else targets[::-1]
                    for t in order:
                        if not t.supports(sc):
                            continue
                        res = run_loadgen(args, t, sc, mock)
                        res["repeat"] = rep
                        raw.append(res)
                        f.write(json.dumps(res) + "\n")
                        f.flush()
                        memory[t.name]["peak"] = max(memory[t.name]["peak"], res["server_rss_peak_mb"])
                        print(f"[{rep + 1}/{args.repeats}] {sc['name']:>14} {t.name:>11}: {res['rps']:>8} req/s"
                              f"  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms"
                              + (f"  ttfb p50 {res['ttfb_p50_ms']} ms" if sc["stream"] else "")
                              + f"  cpu {res['server_cpu_ms_per_req']} ms/req"
                              + (f"  redis {res['redis_cmds_per_req']} cmd/req" if "redis_cmds_per_req" in res
                                 else "")
                              + f"  err {res['errors']}  upstream {res['upstream_requests']}/{res['sent']} sent",
                              flush=True)
        time.sleep(3)
        for t in targets:
            memory[t.name]["idle_end"] = rss_mb(t.server.pid)
        other = statistics.median(r["other_cpu_util"] for r in raw) if raw else 0.0
        if other > 0.15:
            notes.append(f"**noisy machine**: other processes used a median {other:.2f} cores during the runs "
                         f"(of {os.cpu_count()}); absolute numbers are depressed, compare targets within this run")
        summary = report.summarize(raw, [t.name for t in targets], [sc["name"] for sc in scenarios])
        argv = ["python", "bench/run.py", *sys.argv[1:]]
        meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": shlex.join(argv),
                "windows": f"{args.repeats} repeat(s) x {args.duration:g} s measured after {args.warmup:g} s "
                           f"warm-up per scenario x target; mock {args.mock_args}",
                "python": platform.python_version(), "cpus": os.cpu_count(),
                "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                   if ln.startswith("model name")), "?"),
                "pinning": (f"client (loadgen, mock, Redis) on CPU {args.client_cpus}, gateway on CPU "
                            f"{args.gateway_cpus}") if args.pin else "none",
                "git": git_state(), "targets": [t.name for t in targets]}
        (args.out / "summary.json").write_text(json.dumps(
            {"meta": meta, "summary": summary, "memory": memory, "notes": notes}, indent=2))
        md = results_markdown(args, summary, memory, meta, notes)
        (args.out / "summary.md").write_text(md)
        if args.results:
            write_results(Path(args.results), md)
        print("\n" + md + f"\nraw results in {args.out}" + (f"; tables in {args.results}" if args.results else ""))
    finally:
        for s in reversed(servers):
            s.stop()


if __name__ == "__main__":
    main()
