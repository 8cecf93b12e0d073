"""Backend cooldowns, shared through the store: a backend that failed `failures` times within
`window` seconds is skipped by every gateway process for `duration` seconds, then probed again.

Failures are counted in the store (one pipelined INCR+PEXPIRE per failure, off the happy path).
Whether a backend is cooling down is read from a local view that a background task refreshes
from the store every `refresh` seconds (one MGET per process, not one read per request), and
that a process updates at once when it puts a backend in cooldown itself. Another process
therefore learns of a cooldown within `refresh` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from adapters.base import Cooldown

log = logging.getLogger("llm_gateway.cooldown")

_FAIL = "gw:{cooldown}:fail:"
_DOWN = "gw:{cooldown}:down:"


class Cooldowns:
    def __init__(self, store: Any, policies: dict[str, Cooldown], refresh: float = 0.2) -> None:
        self.store = store
        self.policies = policies
        self.refresh = refresh
        self._until: dict[str, float] = {}  # backend -> monotonic time its cooldown ends
        self._local_failures: dict[str, list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._redis = getattr(store, "client", None) if getattr(store, "engine", "") == "redis" else None

    def cooling(self, backend: str) -> bool:
        until = self._until.get(backend)
        return until is not None and until > time.monotonic()

    async def failed(self, backend: str) -> None:
        policy = self.policies.get(backend)
        if policy is None:
            return
        if self._redis is None:
            count = self._count_locally(backend, policy)
        else:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.incr(_FAIL + backend)
                pipe.pexpire(_FAIL + backend, int(policy.window * 1000), nx=True)
                count = (await pipe.execute())[0]
            except Exception as exc:  # the store is down: count locally
                log.warning("cooldown: store unavailable (%s); counting failures locally", type(exc).__name__)
                count = self._count_locally(backend, policy)
        if count >= policy.failures:
            await self._start(backend, policy)

    def _count_locally(self, backend: str, policy: Cooldown) -> int:
        now = time.monotonic()
        recent = [t for t in self._local_failures.get(backend, []) if t > now - policy.window]
        recent.append(now)
        self._local_failures[backend] = recent
        return len(recent)

    async def _start(self, backend: str, policy: Cooldown) -> None:
        self._until[backend] = time.monotonic() + policy.duration
        self._local_failures.pop(backend, None)
        log.warning("backend %s is cooling down for %gs", backend, policy.duration)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                pipe = self._redis.pipeline(transaction=False)
                pipe.set(_DOWN + backend, b"1", px=int(policy.duration * 1000))
                pipe.delete(_FAIL + backend)
                await pipe.execute()

    async def sync(self) -> None:
        """Read every backend's cooldown from the store into the local view."""
        if self._redis is None or not self.policies:
            return
        names = list(self.policies)
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.pttl(_DOWN + name)
        ttls = await pipe.execute()
        now = time.monotonic()
        for name, ttl in zip(names, ttls, strict=True):
            if ttl and ttl > 0:
                self._until[name] = now + ttl / 1000
            elif self._until.get(name, 0) > now and ttl == -2:
                # ended early elsewhere (or the store was flushed): trust the store
                self._until.pop(name, None)

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:
                log.debug("cooldown sync failed: %s", type(exc).__name__)
            await asyncio.sleep(self.refresh)

    def start(self) -> None:
        if self._redis is not None and self.policies and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
