#!/usr/bin/env python3
"""Profile the gateway under load: where does its per-request CPU go?

    python bench/profile.py [--scenario nonstream-c32] [--duration 20]

Starts Redis, the mock upstream and the gateway exactly as bench/run.py does (run_gateway.sh,
pinned to the gateway cpu), drives one scenario with loadgen.py while `py-spy record`
samples the gateway (only threads holding the GIL, so an idle event loop does not count),
then prints and writes (profile.md next to the raw stacks) the top frames by own time, the
top functions by inclusive time and the share of each library. Open stacks.txt in speedscope.app or feed
it to flamegraph.pl for a picture. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from procs import Server, cpu_s, parse_cpus, port_in_use  # noqa: E402

AREAS = [  # (label, pattern on the frame's file as py-spy shortens it); first match wins
    ("llm-gateway: gateway/", r"^gateway/"),
    ("llm-gateway: adapters/", r"^adapters/"),
    ("logging", r"^logging/"),
    ("litestar", r"^litestar/"),
    ("uvicorn", r"^uvicorn/"),
    ("httpx", r"^httpx/"),
    ("httpcore", r"^httpcore/"),
    ("anyio / sniffio", r"^(anyio|sniffio)/"),
    ("h11", r"^h11/"),
    ("redis-py", r"^redis/"),
    ("msgspec", r"^msgspec/"),
    ("asyncio (the event loop: uvloop is C, its time shows in asyncio frames)", r"^asyncio/"),
    ("http.cookiejar / urllib (httpx's cookie jar)", r"^(http/cookiejar|urllib/)"),
    ("other stdlib", r"^[a-z_]+\.py$|^(collections|email|json|concurrent|importlib)/"),
]
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def short(frame: str, keep_line: bool = True) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    line = f":{m.group('line')}" if keep_line and m.group("line") else ""
    return f"{m.group('func')} ({file}{line})"


def area(frame: str) -> str:
    m = FRAME.match(frame)
    file = m.group("file") if m else frame
    for label, pattern in AREAS:
        if re.search(pattern, file):
            return label
    return "other"


def analyse(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(n for _, n in stacks) or 1
    rooted = sum(n for frames, n in stacks if frames[0].startswith("<module>"))
    own, incl, areas, area_incl = Counter(), Counter(), Counter(), Counter()
    for frames, n in stacks:
        own[short(frames[-1])] += n
        areas[area(frames[-1])] += n
        for f in {short(f, keep_line=False) for f in frames}:
            incl[f] += n
        for a in {area(f) for f in frames}:
            area_incl[a] += n

    def table(title: str, counter: Counter, head: str) -> list[str]:
        rows = [f"#### {title}", "", f"| {head} | share of samples |", "|---|---:|"]
        rows += [f"| `{k}` | {v * 100 / total:.1f} % |" for k, v in counter.most_common(top)]
        return [*rows, ""]

    lines = [f"{total} samples of the gateway's busy threads; {100 - rooted * 100 / total:.0f} % of them are "
             "partial stacks (torn reads), so inclusive shares are lower bounds.", ""]
    lines += table("Own time by library (the leaf frame's file)", areas, "library")
    lines += table("Inclusive time by library (any frame on the stack)", area_incl, "library")
    lines += table(f"Top {top} frames by own time", own, "frame")
    lines += table(f"Top {top} functions by inclusive time", incl, "function")
    ours = Counter({k: v for k, v in incl.items() if re.search(r"\((gateway|adapters)/", k)})
    lines += table(f"Top {top} llm-gateway functions by inclusive time", ours, "function")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="nonstream-c32", help="as in run.py, e.g. stream-c16, baidu-c32")
    p.add_argument("--duration", type=float, default=20.0, help="sampled seconds")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--nonblocking", action="store_true",
                   help="do not pause the gateway to sample it (less overhead, but some stacks come out torn)")
    p.add_argument("--all-samples", dest="gil", action="store_false",
                   help="keep samples of threads not holding the GIL (default: only GIL holders, so that an "
                        "event loop waiting in epoll does not count as busy)")
    p.add_argument("--port", type=int, default=4500)
    p.add_argument("--mock-port", type=int, default=9000)
    p.add_argument("--mock-args", default="--chunks 20")
    p.add_argument("--client-cpus", default="0")
    p.add_argument("--gateway-cpus", default="1")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--model", default="mock-gpt")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default=None, help="default bench/out/profile-<time>")
    p.add_argument("--analyse", metavar="STACKS", help="only analyse an earlier stacks.txt")
    args = p.parse_args()
    if args.analyse:
        print(analyse(parse_stacks(Path(args.analyse)), args.top))
        return
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        sys.exit("py-spy not found: pip install py-spy")
    sc = run.parse_scenario(args.scenario)
    args.out = Path(args.out or HERE / "out" / time.strftime("profile-%Y%m%d-%H%M%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.mock_base = f"http://127.0.0.1:{args.mock_port}"
    args.pin = args.pin and shutil.which("taskset") is not None
    base = f"http://127.0.0.1:{args.port}"
    for url in (args.mock_base, base):
        if port_in_use(url):
            sys.exit(f"{url} already answers: stop whatever listens there first")
    if args.pin:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))

    servers: list[Server] = []
    try:
        redis_srv, redis_url = run.start_redis(args)
        servers.append(redis_srv)
        cpus = args.client_cpus if args.pin else None
        mock = Server("mock", [args.python, str(HERE / "mock_upstream.py"), "--port", str(args.mock_port),
                               *args.mock_args.split()], args.out / "mock.log", cwd=HERE, cpus=cpus)
        servers.append(mock)
        run.wait_ready(mock, args.mock_base, args, 15)
        env = dict(os.environ, PORT=str(args.port), UPSTREAM_BASE=args.mock_base + "/v1", REDIS_URL=redis_url,
                   BENCH_CONFIG_DIR=str(args.out / "gateway-config"))
        gw = Server("llm-gateway", ["./run_gateway.sh"], args.out / "llm-gateway.log", cwd=HERE, env=env,
                    cpus=args.gateway_cpus if args.pin else None)
        servers.append(gw)
        target = run.Target("llm-gateway", base, gw, redis_url=redis_url)
        run.wait_ready(gw, base, args, 60)
        if sc["dialect"] == "baidu":
            target.baidu_token = run.baidu_token(base, args)
            if target.baidu_token is None:
                sys.exit("the gateway has no working Baidu door")
        cmd = [args.python, str(HERE / "loadgen.py"), "--json", *target.loadgen_args(sc),
               "-c", str(sc["concurrency"]), "-d", str(args.duration + 2), "-w", "1", "--model", args.model,
               "--api-key", args.api_key] + (["--stream"] if sc["stream"] else [])
        if args.pin:
            cmd = ["taskset", "-c", args.client_cpus, *cmd]
        load = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)  # past the loadgen's warm-up start
        cpu0 = cpu_s(gw.pid)
        stacks = args.out / "stacks.txt"
        subprocess.run([py_spy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--duration",
                        str(int(args.duration)), "--format", "raw", "--output", str(stacks),
                        *(["--gil"] if args.gil else []), *(["--nonblocking"] if args.nonblocking else [])],
                       check=True, capture_output=True)
        cpu1 = cpu_s(gw.pid)
        res = json.loads(load.communicate(timeout=args.duration + 60)[0])
        res["url"] = re.sub(r"access_token=[^&]+", "access_token=***", res["url"])
        cpu_ms = (cpu1 - cpu0) * 1000 / max(1, res["rps"] * args.duration)
        head = (f"### Profile: {args.scenario}, {args.duration:g} s, py-spy {args.rate} Hz"
                f"{', non-blocking' if args.nonblocking else ''}"
                f"{', GIL holders only' if args.gil else ''}\n\n"
                f"Command: `python bench/profile.py {' '.join(sys.argv[1:])}`. Under the profiler the gateway "
                f"served {res['rps']} req/s (p50 {res['p50_ms']} ms, {res['errors']} errors) at about "
                f"{cpu_ms:.2f} CPU ms/request.\n\n")
        run_stacks = parse_stacks(stacks)
        md = head + analyse(run_stacks, args.top)
        (args.out / "profile.md").write_text(md)
        print(md)
        print(f"\nraw stacks ({len(run_stacks)} distinct) in {stacks}")
    finally:
        for s in reversed(servers):
            s.stop()


if __name__ == "__main__":
    main()
