#!/usr/bin/env python3
"""Closed-loop load generator for OpenAI-compatible POST /v1/chat/completions.

`--concurrency` workers each send requests back to back over keep-alive
connections for `--warmup` + `--duration` seconds (or until `--requests`
have been sent). Only requests that complete inside the measurement window
(after warm-up) are counted. Reports requests/s, latency p50/p90/p99/max,
errors and, with --stream, time to first body byte (TTFB) and SSE events.

`--rate R` makes it open-loop instead: requests start on a fixed schedule, one every 1/R s
(launched in batches when the event loop's timer is coarser than that), whatever the answers
do, with at most `--concurrency` connections; each latency is measured from the request's
scheduled start, so a server (or client) that falls behind shows it in the latencies rather
than in a lower send rate (no coordinated omission). A closed loop at saturation measures
the queue it builds; an open loop below saturation measures the latency a steady load sees.

`--dialect baidu` sends Baidu wenxinworkshop chat bodies instead (the URL carries
`?access_token=`): a success is a JSON body with `result` and no `error_code`, a stream
ends with an `"is_end":true` event.

Loopback targets only; every loop is bounded in time and count.

Copied from ../shared/bench/loadgen.py (the project's reference harness); the Baidu
dialect was added here.
"""
import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp

MAX_REQUESTS = 10_000_000


def pct(sorted_vals, p):
    """Nearest-rank percentile of an ascending list, in the list's unit."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def parse_headers(items):
    """['Name: value', ...] -> {'Name': 'value'} (curl -H syntax)."""
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            sys.exit(f"bad header {item!r}: use 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def check_loopback(url):
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"refusing non-loopback target {host!r}: loopback (127.0.0.0/8, ::1) only")


def request_body(args):
    messages = [{"role": "user", "content": args.prompt}]
    if args.dialect == "baidu":
        return json.dumps({"messages": messages, "stream": args.stream,
                           "max_output_tokens": args.max_tokens}).encode()
    return json.dumps({"model": args.model, "messages": messages,
                       "max_tokens": args.max_tokens, "stream": args.stream}).encode()


def body_ok(args, data):
    """Is a 200 response body a complete, successful answer in the target's dialect?"""
    if args.dialect == "baidu":
        if args.stream:
            return b'"is_end":true' in data and b'"error_code"' not in data
        return b'"result"' in data and b'"error_code"' not in data
    if args.stream:
        return data.rstrip().endswith(b"data: [DONE]")
    return b'"choices"' in data


async def run(args):
    body = request_body(args)
    headers = {"Content-Type": "application/json", **args.extra_headers}
    if args.dialect == "openai":
        headers["Authorization"] = f"Bearer {args.api_key}"
    lat, ttfb, events = [], [], []
    errors = Counter()
    first_error = []
    sent = 0

    t_start = time.perf_counter()
    t_warm = t_start + args.warmup
    t_end = t_warm + args.duration
    last_done = t_warm

    async def one(session, t0=None):
        if t0 is None:
            t0 = time.perf_counter()
        t_first = None
        err = None
        try:
            async with session.post(args.url, data=body, headers=headers) as resp:
                if args.stream:
                    buf = []
                    async for chunk in resp.content.iter_any():
                        if t_first is None:
                            t_first = time.perf_counter()
                        buf.append(chunk)
                    data = b"".join(buf)
                else:
                    data = await resp.read()
                ok = resp.status == 200 and body_ok(args, data)
                if not ok:
                    err = f"http_{resp.status}" if resp.status != 200 else "bad_body"
                    if not first_error:
                        first_error.append(data[:300].decode(errors="replace"))
        except Exception as e:  # any failure is an error sample
            err = type(e).__name__
            if not first_error:
                first_error.append(repr(e)[:300])
        return t0, t_first, time.perf_counter(), err, (data.count(b"data:") if args.stream and not err else 0)

    def record(t0, t_first, t1, err, n_events):
        nonlocal last_done
        if t_warm <= t1 <= t_end:
            last_done = max(last_done, t1)
            if err:
                errors[err] += 1
            else:
                lat.append(t1 - t0)
                if t_first is not None:
                    ttfb.append(t_first - t0)
                    events.append(n_events)

    async def worker(session):
        nonlocal sent
        while sent < args.requests and time.perf_counter() < t_end:
            sent += 1
            record(*await one(session))

    async def scheduled(session, due):
        record(*await one(session, due))

    async def open_loop(session):
        nonlocal sent
        interval = 1.0 / args.rate
        running = set()
        k = 0
        while sent < args.requests:
            due = t_start + k * interval
            if due >= t_end:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            sent += 1
            k += 1
            task = asyncio.ensure_future(scheduled(session, due))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=args.timeout + 5)

    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency,
                                     ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        if args.rate:
            await open_loop(session)
        else:
            await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))

    # window ends at t_end, or earlier when --requests ran out first
    window = max(1e-9, (t_end if sent < args.requests else last_done) - t_warm)
    lat.sort()
    ttfb.sort()
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    result = {
        "url": args.url, "stream": args.stream, "concurrency": args.concurrency, "rate": args.rate,
        "duration_s": round(window, 3), "sent": sent, "ok": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors), "rps": round(len(lat) / window, 1),
        "p50_ms": ms(pct(lat, 50)), "p90_ms": ms(pct(lat, 90)), "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "mean_ms": ms(sum(lat) / len(lat) if lat else None),
    }
    if args.stream:
        result.update({"ttfb_p50_ms": ms(pct(ttfb, 50)), "ttfb_p99_ms": ms(pct(ttfb, 99)),
                       "sse_events_mean": round(sum(events) / len(events), 1) if events else None})
    if first_error:
        result["first_error"] = first_error[0]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:9000/v1/chat/completions",
                   help="full chat completions URL (loopback only)")
    p.add_argument("-c", "--concurrency", type=int, default=1,
                   help="closed loop: clients sending back to back; with --rate: most connections")
    p.add_argument("-r", "--rate", type=float, default=0.0,
                   help="open loop: start this many requests per second on a fixed schedule")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("-n", "--requests", type=int, default=MAX_REQUESTS,
                   help="cap on requests sent, warm-up included")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--dialect", choices=("openai", "baidu"), default="openai",
                   help="request/response format (baidu: the URL must carry ?access_token=)")
    p.add_argument("--model", default="mock-gpt")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header, e.g. 'x-portkey-provider: openai'; repeatable")
    p.add_argument("--prompt", default="Say hello.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    check_loopback(args.url)
    args.extra_headers = parse_headers(args.header)
    if not 0 <= args.rate <= 100_000:
        sys.exit("rate must be in [0, 100000] requests/s")
    if not (0 < args.duration <= 3600 and 0 <= args.warmup <= 600):
        sys.exit("duration must be in (0, 3600] s and warm-up in [0, 600] s")
    args.requests = min(args.requests, MAX_REQUESTS)

    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            pass
    res = runner(run(args))
    if args.json:
        print(json.dumps(res))
        return
    load = f"rate={args.rate:g}/s (c<={res['concurrency']})" if args.rate else f"c={res['concurrency']}"
    print(f"{res['url']}  stream={res['stream']}  {load}  "
          f"{res['duration_s']}s  ok={res['ok']}  errors={res['errors']} {res['error_kinds'] or ''}")
    print(f"  rps={res['rps']}  p50={res['p50_ms']}ms  p90={res['p90_ms']}ms  "
          f"p99={res['p99_ms']}ms  max={res['max_ms']}ms")
    if args.stream:
        print(f"  ttfb p50={res['ttfb_p50_ms']}ms  p99={res['ttfb_p99_ms']}ms  "
              f"sse events/resp={res['sse_events_mean']}")
    if "first_error" in res:
        print(f"  first error: {res['first_error']}")


if __name__ == "__main__":
    main()
