"""`llm-gateway serve | check | demo | usage`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from gateway.config import Config, ConfigError, load_config

_CONFIG_ENV = "LLM_GATEWAY_CONFIG"


def app_factory():  # type: ignore[no-untyped-def]
    """uvicorn worker entry point (`--workers N`): the config path comes from the parent."""
    from gateway.app import create_app

    path = os.environ[_CONFIG_ENV]
    return create_app(load_config(path), config_path=path)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    config = load_config(args.config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    # No access log, no proxy-header rewriting, no Server/Date headers: per-request work
    # that a gateway behind a load balancer does not need.
    opts = {"host": host, "port": port, "log_level": args.log_level, "access_log": False,
            "loop": "uvloop", "http": "httptools", "timeout_graceful_shutdown": 30,
            "proxy_headers": False, "server_header": False, "date_header": False}
    if workers > 1:
        import shutil
        import tempfile

        from uvicorn.supervisors import Multiprocess

        from gateway.metrics import SHARED_DIR_ENV

        path = str(Path(args.config).resolve())
        os.environ[_CONFIG_ENV] = path
        # every worker publishes its metrics here, so that a scrape of any worker sees them all
        metrics_dir = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        os.environ[SHARED_DIR_ENV] = metrics_dir

        class ReloadingSupervisor(Multiprocess):
            """SIGHUP reloads the config in every worker instead of restarting them, after
            checking it here first, so a broken file restarts nothing."""

            def handle_hup(self) -> None:
                try:
                    load_config(path)
                except ConfigError as exc:
                    logging.getLogger("llm_gateway").error(
                        "config reload refused, the previous config keeps serving: %s", exc)
                    return
                for proc in self.processes:
                    if proc.process.pid is not None:
                        os.kill(proc.process.pid, signal.SIGHUP)

        ucfg = uvicorn.Config("gateway.cli:app_factory", factory=True, workers=workers, **opts)
        try:
            ReloadingSupervisor(ucfg, sockets=[ucfg.bind_socket()]).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        from gateway.app import create_app

        uvicorn.run(create_app(config, config_path=args.config), **opts)
    return 0


def describe(config: Config) -> str:
    """The aliases -> backends table that `check` prints."""
    rows = [("alias", "strategy", "targets", "fallbacks", "timeouts (s)")]
    for alias, route in config.models.items():
        targets = ", ".join(
            f"{t.backend}({config.backends[t.backend].__struct_config__.tag}"
            + (f", w={t.weight:g}" if route.strategy == "weighted" else "")
            + (f", p={t.priority}" if route.strategy == "priority" and t.priority else "") + ")"
            for t in route.targets)
        timeouts = "; ".join(
            f"{t.backend}: " + ", ".join(f"{k}={v:g}" for k, v in _timeouts(config, t.backend))
            for t in route.targets)
        rows.append((alias, route.strategy, targets, ", ".join(route.fallbacks) or "-", timeouts))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _timeouts(config: Config, backend: str) -> list[tuple[str, float]]:
    import msgspec

    t = msgspec.structs.asdict(config.backends[backend].timeout)
    return [(k, v) for k, v in t.items() if isinstance(v, int | float)]


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: OK ({len(config.backends)} backends, {len(config.models)} aliases, "
          f"{len(config.keys)} keys, store {config.store.url.split('@')[-1]})")
    print(describe(config))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(host=args.host or "127.0.0.1", port=args.port or 8080)


def _usage(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.admin import read_usage, usage_table

    config = load_config(args.config)
    try:
        report = asyncio.run(read_usage(config, args.user, args.days))
    except Exception as exc:  # the store or the gateway cannot be reached: say so, no traceback
        print(f"usage: cannot read usage: {exc}", file=sys.stderr)
        return 1
    print(usage_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check", help="validate a config and print its routes")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check)
    demo = sub.add_parser("demo", help="run the gateway in front of built-in emulators")
    demo.add_argument("--host")
    demo.add_argument("--port", type=int)
    demo.set_defaults(func=_demo)
    usage = sub.add_parser("usage", help="print token usage per user, alias, backend and day")
    usage.add_argument("--config", required=True)
    usage.add_argument("--user")
    usage.add_argument("--days", type=int, default=7, help="the last N days, today included (default 7)")
    usage.set_defaults(func=_usage)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL at INFO: a cost on the hot path, and URLs may carry tokens.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
