"""`create_app(config)`: the only place that wires the gateway together.

`Gateway` owns what lives for a config's lifetime (adapters, router, pipeline, doors) and the
store, which outlives reloads so that limit counters are never reset. Nothing here reads the
environment; the CLI loads the config and passes it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.handlers import asgi

from adapters.base import Adapter, AdapterContext
from adapters.registry import build_adapter
from gateway.admin import usage_report
from gateway.asgi import JSON, Receive, Scope, Send, send_response
from gateway.auth import KeyRing
from gateway.cache import ResponseCache
from gateway.config import Config, ConfigError, load_config
from gateway.errors import AuthenticationFailed, GatewayError
from gateway.inbound.baidu import API_PREFIX, SERVICE_LIST_PATH, BaiduDoor
from gateway.inbound.baidu_codec import BaiduFault
from gateway.inbound.baidu_codec import error_body as baidu_error_body
from gateway.inbound.openai import OpenAIDoor, error_body
from gateway.limits import Limiter
from gateway.metrics import CONTENT_TYPE, GatewayCollector, Metrics, build_registry, render, shared_from_env
from gateway.pipeline import Pipeline
from gateway.routing import BackendStats, Router
from gateway.store import Store, open_store
from gateway.usage import UsageLedger

log = logging.getLogger("llm_gateway")


class Routes:
    """Everything built from one config: replaced whole on reload."""

    def __init__(self, config: Config, store: Store, stats: dict[str, BackendStats],
                 limiter: Limiter | None = None, cache: ResponseCache | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.keyring = KeyRing(config)
        self.adapters: dict[str, Adapter] = {
            name: build_adapter(cfg, AdapterContext(name=name, state=store))
            for name, cfg in config.backends.items()
        }
        self.router = Router(config, self.adapters, store, stats)
        self.pipeline = Pipeline(config, self.keyring, self.adapters, self.router, limiter, cache, metrics)
        self.openai = OpenAIDoor(self.pipeline)
        self.baidu = BaiduDoor(self.pipeline.for_door("baidu"), store, config)

    def start(self) -> None:
        self.router.cooldowns.start()

    async def aclose(self) -> None:
        await self.router.cooldowns.aclose()
        for adapter in self.adapters.values():
            try:
                await adapter.aclose()
            except Exception:  # closing is best effort
                log.exception("closing adapter %s failed", adapter.name)


class Gateway:
    def __init__(self, config: Config, config_path: str | Path | None = None) -> None:
        self.config_path = config_path
        self.store = open_store(config.store.url, config.store.timeout_ms)
        self.stats: dict[str, BackendStats] = {}  # survives reloads, like the store's counters
        # The limiter keeps live slots alive and pending settlements queued across reloads.
        self.limiter = Limiter(self.store, config.store.on_error, slot_ttl=config.store.slot_ttl)
        self.cache = ResponseCache(self.store)
        self.ledger = UsageLedger(self.store)
        self.metrics = Metrics()  # survives reloads; read at scrape time through self.registry
        self.collector = GatewayCollector(self.metrics, self._metric_sources, shared_from_env())
        self.registry = build_registry(self.collector)
        self._publisher: asyncio.Task[None] | None = None
        self.routes = Routes(config, self.store, self.stats, self.limiter, self.cache, self.metrics)
        self._retired: set[asyncio.Task[None]] = set()

    def _metric_sources(self) -> dict[str, object]:
        routes = self.routes
        return {"limiter": self.limiter, "cache": self.cache, "stats": self.stats,
                "cooldowns": routes.router.cooldowns, "backends": list(routes.config.backends)}

    async def reload(self) -> None:
        """Re-read the YAML; swap routes atomically, or keep the old ones if it is invalid.

        Raises ConfigError (the old routes keep serving). In-flight requests finish on the old
        routes; their connection pools are closed after a grace period."""
        if self.config_path is None:
            raise ConfigError("this gateway was not started from a config file")
        config = load_config(self.config_path)
        if config.store.url != self.routes.config.store.url:
            raise ConfigError("store.url cannot change on reload; restart the gateway")
        new = Routes(config, self.store, self.stats, self.limiter, self.cache, self.metrics)
        self.limiter.on_error = config.store.on_error
        new.start()
        old, self.routes = self.routes, new
        log.info("config reloaded from %s", self.config_path)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _retire(self, old: Routes, grace: float = 300.0) -> None:
        await old.router.cooldowns.aclose()
        await asyncio.sleep(grace)
        await old.aclose()

    async def reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("config reload refused, the previous config keeps serving: %s", exc)

    def start(self) -> None:
        self.routes.start()
        if self.collector.shared is not None:  # one of `serve --workers N`: publish for whichever is scraped
            self._publisher = asyncio.get_running_loop().create_task(self.collector.keep_publishing())

    async def aclose(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        await self.routes.aclose()
        await self.limiter.aclose()  # lands the settlements still waiting for the store
        await self.store.aclose()


def _admin(request: Request, gw: Gateway) -> None:
    key = gw.routes.config.admin.key
    auth = request.headers.get("authorization", "")
    if not key or auth != f"Bearer {key}":
        raise AuthenticationFailed("admin routes need Authorization: Bearer <admin key>")


def _error_response(err: GatewayError) -> Response[bytes]:
    return Response(error_body(err), status_code=err.status, media_type=MediaType.JSON)


def create_app(config: Config, config_path: str | Path | None = None) -> Litestar:
    gw = Gateway(config, config_path)

    @asgi("/v1/chat/completions", is_mount=False, copy_scope=False)
    async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
        await gw.routes.openai.chat_completions(scope, receive, send)

    @asgi("/v1/completions", is_mount=False, copy_scope=False)
    async def completions(scope: Scope, receive: Receive, send: Send) -> None:
        await gw.routes.openai.completions(scope, receive, send)

    # Baidu: everything under the wenxinworkshop prefix, so an unknown path gets Baidu's code 3.
    @asgi(API_PREFIX, is_mount=True, copy_scope=False)
    async def baidu_chat(scope: Scope, receive: Receive, send: Send) -> None:
        await gw.routes.baidu.chat(scope, receive, send)

    @asgi("/oauth/2.0/token", is_mount=False, copy_scope=False)
    async def baidu_token(scope: Scope, receive: Receive, send: Send) -> None:
        await gw.routes.baidu.token(scope, receive, send)

    @asgi(SERVICE_LIST_PATH, is_mount=False, copy_scope=False)
    async def baidu_service_list(scope: Scope, receive: Receive, send: Send) -> None:
        await gw.routes.baidu.service_list(scope, receive, send)

    @get("/v1/models", media_type=MediaType.JSON)
    async def models(request: Request) -> Response[bytes]:
        auth = request.headers.get("authorization", "")
        secret = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        return Response(gw.routes.openai.models(secret), media_type=MediaType.JSON)

    @get("/healthz", media_type=MediaType.JSON)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", media_type=MediaType.JSON)
    async def readyz() -> Response[dict[str, object]]:
        store_ok = await gw.store.ping()
        body = {"status": "ready" if store_ok else "degraded", "store": gw.store.engine,
                "store_ok": store_ok, "aliases": len(gw.routes.config.models),
                "pending_settlements": gw.limiter.pending}
        return Response(body, status_code=200 if store_ok else 503)

    @get("/metrics", media_type=CONTENT_TYPE)
    async def metrics() -> Response[bytes]:
        # No key, like /healthz: scrapers should not hold the admin key, and no sample names a
        # user or a key (labels are doors, aliases, backends, status and error codes).
        return Response(render(gw.registry), media_type=CONTENT_TYPE)

    @get("/admin/usage", media_type=MediaType.JSON)
    async def admin_usage(request: Request) -> Response[bytes]:
        _admin(request, gw)
        return Response(await usage_report(gw.ledger, request.query_params), media_type=MediaType.JSON)

    @post("/admin/reload", media_type=MediaType.JSON, status_code=200)
    async def admin_reload(request: Request) -> Response[bytes]:
        _admin(request, gw)
        try:
            await gw.reload()
        except ConfigError as exc:
            log.error("config reload refused: %s", exc)
            return Response(msgspec.json.encode({"status": "refused", "error": str(exc)}),
                            status_code=400, media_type=MediaType.JSON)
        return Response(b'{"status":"reloaded"}', media_type=MediaType.JSON)

    def on_gateway_error(_: Request, exc: GatewayError) -> Response[bytes]:
        return _error_response(exc)

    def on_unexpected(_: Request, exc: Exception) -> Response[bytes]:
        status = getattr(exc, "status_code", 500)
        if status >= 500:
            log.exception("unhandled error", exc_info=exc)
        message = getattr(exc, "detail", None) or "The server had an error while processing your request."
        return _error_response(GatewayError(str(message), status=status,
                                            code="not_found" if status == 404 else None))

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        gw.start()
        if config_path is not None and threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gw.reload_logged()))
        try:
            yield
        finally:
            await gw.aclose()

    app = GatewayApp(
        route_handlers=[chat_completions, completions, baidu_chat, baidu_token, baidu_service_list, models,
                        healthz, readyz, metrics, admin_usage, admin_reload],
        exception_handlers={GatewayError: on_gateway_error, Exception: on_unexpected},
        lifespan=[lifespan],
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    app.state.gateway = gw
    app.hot_routes = {"/v1/chat/completions": chat_completions.fn, "/v1/completions": completions.fn}
    app.hot_prefix = (API_PREFIX + "/chat/", baidu_chat.fn)
    return app


class GatewayApp(Litestar):
    """Litestar, with the chat routes dispatched before its router and middleware.

    The chat doors are raw ASGI handlers that render their own errors; Litestar's per-message
    `send` wrapper and routing cost 3-15 % of the CPU of a request (more when streaming), so
    the exact chat paths go straight to them. Everything else, and the same routes when
    reached some other way, goes through Litestar as usual."""

    hot_routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}
    hot_prefix: tuple[str, Callable[[Scope, Receive, Send], Awaitable[None]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http":
            path = scope["path"]
            route = self.hot_routes.get(path)
            baidu = route is None and self.hot_prefix is not None and path.startswith(self.hot_prefix[0])
            if baidu:
                route = self.hot_prefix[1]  # type: ignore[index]
            if route is not None:
                try:
                    await route(scope, receive, send)
                except Exception:
                    log.exception("unhandled error on %s", path)
                    body = (baidu_error_body(BaiduFault(336000, "Internal error")) if baidu else
                            error_body(GatewayError("The server had an error while processing your request.")))
                    with contextlib.suppress(Exception):  # fails if the response had started
                        await send_response(send, 500 if not baidu else 200, body, [JSON])
                return
        await super().__call__(scope, receive, send)  # type: ignore[arg-type]
