#!/usr/bin/env python3
"""CPU per request of the HTTP clients a gateway could use to call its upstream.

    python bench/client_cost.py [--requests 4000] [--concurrency 1,32]

Starts the mock upstream (mock_upstream.py) on the client cpu, then, in this process pinned
to the gateway cpu and on uvloop, sends the same non-streaming chat request N times at each
concurrency with each client and reports this process's CPU time per request:

- httpx-client: `httpx.AsyncClient.post` + body, built as adapters/openai/adapter.py builds it
  (max_connections 256), with the httpx INFO log enabled as under `llm-gateway serve`
- httpx-client-nolog: the same with the httpx logger at WARNING
- httpx-transport: `httpx.AsyncHTTPTransport.handle_async_request` directly (no cookies,
  auth, redirects, logging)
- aiohttp: `aiohttp.ClientSession.post` + body (TCPConnector limit 256)
- llm-gateway-http1: `adapters.http1.Pool.request`, the client the OpenAI adapter uses

It measures the client alone (no server side), which is what the gateway pays per upstream
call on top of its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from procs import Server, free_port, parse_cpus  # noqa: E402

from adapters import http1  # noqa: E402

BODY = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello."}],
                   "max_tokens": 32}).encode()
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-mock"}


async def drive(call: Callable[[], Awaitable[bytes]], n: int, c: int) -> float:
    """CPU seconds per request for n calls at concurrency c (after 200 unmeasured calls)."""
    left = 200

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            assert b'"choices"' in await call()

    await asyncio.gather(*(worker() for _ in range(c)))
    left = n
    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(c)))
    return (time.process_time() - t0) / n


async def measure(base: str, n: int, c: int) -> dict[str, float]:
    out: dict[str, float] = {}
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(connect=2, read=30, write=30, pool=2)
    for name, level in (("httpx-client", logging.INFO), ("httpx-client-nolog", logging.WARNING)):
        logging.getLogger("httpx").setLevel(level)
        async with httpx.AsyncClient(base_url=base + "/v1", headers=HEADERS, timeout=timeout,
                                     limits=limits) as client:
            async def call(client: httpx.AsyncClient = client) -> bytes:
                return (await client.post("/chat/completions", content=BODY)).content

            out[name] = await drive(call, n, c)
    async with httpx.AsyncHTTPTransport(limits=limits) as transport:
        async def call_transport() -> bytes:
            req = httpx.Request("POST", url, headers=HEADERS, content=BODY)
            resp = await transport.handle_async_request(req)
            try:
                return await resp.aread()
            finally:
                await resp.aclose()

        out["httpx-transport"] = await drive(call_transport, n, c)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:
        async def call_aiohttp() -> bytes:
            async with session.post(url, data=BODY) as resp:
                return await resp.read()

        out["aiohttp"] = await drive(call_aiohttp, n, c)
    pool = http1.Pool(base + "/v1", max_connections=256, connect_timeout=2, read_timeout=30, headers=HEADERS)

    async def call_http1() -> bytes:
        return (await pool.request("POST", "/chat/completions", BODY))[2]

    out["llm-gateway-http1"] = await drive(call_http1, n, c)
    await pool.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--client-cpus", default="0", help="cpus for the mock")
    p.add_argument("--gateway-cpus", default="1", help="cpus for the measured clients (this process)")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    args = p.parse_args()
    pin = args.pin and shutil.which("taskset") is not None
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    # like `llm-gateway serve` with its output in a log file
    logging.basicConfig(level=logging.INFO, filename=out_dir / "client-cost-httpx.log", filemode="w")
    port = free_port()
    mock = Server("mock", [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(port)],
                  out_dir / "client-cost-mock.log", cwd=HERE, cpus=args.client_cpus if pin else None)
    try:
        if pin:
            os.sched_setaffinity(0, parse_cpus(args.gateway_cpus))
        time.sleep(1.0)
        import uvloop

        rows = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            rows[c] = uvloop.run(measure(f"http://127.0.0.1:{port}", args.requests, c))
        names = list(next(iter(rows.values())))
        print("| client | " + " | ".join(f"CPU ms/request at c={c}" for c in rows) + " |")
        print("|---|" + "---:|" * len(rows))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{rows[c][name] * 1000:.3f}" for c in rows) + " |")
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
