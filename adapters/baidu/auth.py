"""How the adapter proves who it is to Baidu, in either mode.

- `AccessTokenSource` (api_key + secret_key): one OAuth access token shared by every gateway
  process through the `SharedState` (Redis when configured). Refreshed ahead of `expires_in`
  by exactly one process: the one that takes the store lock fetches; the others keep using the
  still-valid token, or, when there is none, wait briefly and re-read. Within a process an
  asyncio lock makes sure only one coroutine goes to the store at all. `invalidate(token)`
  (after error_code 110/111) drops that token, unless another process already replaced it.
- `SigningAuth` (access_key + secret_key): each request signed with `bce-auth-v1`
  (`adapters.baidu.signer`), with `x-bce-content-sha256` signed too so a changed body fails.

If the store fails, the token source degrades to a per-process token (logged, no secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

import httpx
import msgspec

from adapters.baidu.errors import redact
from adapters.baidu.signer import canonical_time, sign
from adapters.baidu.wire import TOKEN_PATH, TokenResponse
from adapters.base import SharedState
from adapters.types import UpstreamAuthError, UpstreamError, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("adapters.baidu")

SIGNED_HEADERS = ("content-type", "host", "x-bce-content-sha256", "x-bce-date")


def fingerprint(token: str) -> str:
    """A log-safe name for a token: never its value, not even a prefix."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class CachedToken(msgspec.Struct):
    value: str
    expires_at: float  # unix seconds
    refresh_at: float  # unix seconds; after this one process fetches a new token

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at

    def usable(self, now: float) -> bool:
        # Leave room for the request to reach Baidu before the token lapses.
        return now < self.expires_at - min(5.0, (self.expires_at - self.refresh_at) / 2)


_encode = msgspec.json.Encoder().encode
_decode_cached = msgspec.json.Decoder(CachedToken).decode
_decode_token = msgspec.json.Decoder(TokenResponse).decode


class AccessTokenSource:
    POLL = 0.05  # seconds between store reads while another process refreshes

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        backend: str,
        api_key: str,
        secret_key: str,
        state: SharedState,
        refresh_margin: float,
        fetch_timeout: float,
    ) -> None:
        self._client = client
        self._backend = backend
        self._params = {"grant_type": "client_credentials", "client_id": api_key, "client_secret": secret_key}
        self._state = state
        self._margin = refresh_margin
        self._fetch_timeout = fetch_timeout
        # Per backend and credential pair: rotating the secret never reuses the old token.
        who = hashlib.sha256(f"{api_key}\0{secret_key}".encode()).hexdigest()[:12]
        self._key = f"gw:{{baidu}}:token:{backend}:{who}"
        self._lock_key = f"gw:{{baidu}}:token-lock:{backend}:{who}"
        self._local: CachedToken | None = None
        self._mutex = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None
        self._next_renewal = 0.0
        self.fetches = 0  # token endpoint calls made by this process

    async def token(self) -> str:
        now = time.time()
        tok = self._local
        if tok is not None and tok.fresh(now):
            return tok.value
        if tok is not None and tok.usable(now):
            self._renew_in_background()
            return tok.value
        return await self._obtain(bad=None, need_fresh=False)

    async def invalidate(self, bad: str) -> str:
        """Baidu refused `bad` (110/111): return a different token (a new one if needed)."""
        return await self._obtain(bad=bad, need_fresh=False)

    async def aclose(self) -> None:
        if self._renewal is not None and not self._renewal.done():
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewal

    # -- internals -------------------------------------------------------------------------

    def _renew_in_background(self) -> None:
        if (self._renewal is not None and not self._renewal.done()) or time.monotonic() < self._next_renewal:
            return
        self._next_renewal = time.monotonic() + 0.25
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        try:
            await self._obtain(bad=None, need_fresh=True)
        except UpstreamError as exc:
            log.warning("baidu backend %s: background token refresh failed: %s", self._backend, exc.message)

    async def _obtain(self, bad: str | None, need_fresh: bool) -> str:
        async with self._mutex:
            now = time.time()
            tok = self._local
            if tok is not None and tok.value != bad and (
                tok.fresh(now) or (not need_fresh and tok.usable(now))
            ):
                return tok.value
            self._local = tok = await self._shared(bad, wait=not need_fresh)
            return tok.value

    async def _shared(self, bad: str | None, wait: bool) -> CachedToken:
        """A fresh token from the store, or fetched under the store lock; while another
        process holds the lock, a still-valid cached token is used, or we wait and re-read."""
        deadline = time.monotonic() + self._fetch_timeout + 2.0
        while True:
            cached = await self._read()
            now = time.time()
            if cached is not None and cached.value != bad and cached.fresh(now):
                return cached
            lock = await self._try_lock()
            if lock is not None:
                try:
                    cached = await self._read()  # another process may have finished meanwhile
                    if cached is not None and cached.value != bad and cached.fresh(time.time()):
                        return cached
                    if bad is not None and cached is not None and cached.value == bad:
                        await self._delete()
                    fetched = await self._fetch()
                    await self._write(fetched)
                    return fetched
                finally:
                    if lock:
                        await self._unlock(lock)
            if cached is not None and cached.value != bad and cached.usable(now):
                return cached  # someone else is refreshing; this one still works
            if not wait:
                raise UpstreamUnavailable("token refresh already in progress elsewhere")
            if time.monotonic() > deadline:
                raise UpstreamTimeout(
                    f"Baidu backend {self._backend!r}: timed out waiting for another gateway process "
                    "to refresh the access token"
                )
            await asyncio.sleep(self.POLL)

    async def _fetch(self) -> CachedToken:
        self.fetches += 1
        asked_at = time.time()  # Baidu's clock starts before its answer reaches us
        try:
            resp = await self._client.post(
                TOKEN_PATH, params=self._params, headers={"Content-Type": "application/json"},
                timeout=self._fetch_timeout,
            )
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Baidu backend {self._backend!r}: the token endpoint timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"Baidu backend {self._backend!r}: the token endpoint is unreachable "
                f"({type(exc).__name__}: {redact(str(exc))})"
            ) from None
        try:
            body = _decode_token(resp.content)
        except msgspec.DecodeError:
            body = TokenResponse(error=f"HTTP {resp.status_code}", error_description="unreadable answer")
        if resp.status_code != 200 or body.error or not body.access_token:
            what = redact(f"{body.error or 'HTTP ' + str(resp.status_code)}: {body.error_description}")
            if resp.status_code >= 500:
                raise UpstreamUnavailable(f"Baidu backend {self._backend!r}: the token endpoint failed ({what})")
            raise UpstreamAuthError(
                f"Baidu backend {self._backend!r}: the token endpoint refused the gateway's api_key/secret_key "
                f"({what}); check the backend's credentials"
            )
        life = max(1.0, float(body.expires_in))
        tok = CachedToken(body.access_token, asked_at + life, asked_at + life - min(self._margin, life / 5))
        log.info(
            "baidu backend %s: fetched access token #%s (expires in %ss)",
            self._backend, fingerprint(tok.value), body.expires_in,
        )
        return tok

    # The store is shared state, not a dependency we may fail on: if it is down, we behave as
    # a single process (the in-process mutex still single-flights the refresh).

    async def _read(self) -> CachedToken | None:
        try:
            raw = await self._state.get(self._key)
        except Exception as exc:
            self._store_failed("read", exc)
            return None
        if raw is None:
            return None
        try:
            return _decode_cached(raw)
        except msgspec.DecodeError:
            return None

    async def _write(self, tok: CachedToken) -> None:
        try:
            await self._state.set(self._key, _encode(tok), ttl=max(1.0, tok.expires_at - time.time()))
        except Exception as exc:
            self._store_failed("write", exc)

    async def _delete(self) -> None:
        try:
            await self._state.delete(self._key)
        except Exception as exc:
            self._store_failed("delete", exc)

    async def _try_lock(self) -> str | None:
        try:
            return await self._state.acquire_lock(self._lock_key, ttl=self._fetch_timeout + 1.0)
        except Exception as exc:
            self._store_failed("lock", exc)
            return ""  # proceed as the only process

    async def _unlock(self, token: str) -> None:
        try:
            await self._state.release_lock(self._lock_key, token)
        except Exception as exc:
            self._store_failed("unlock", exc)

    def _store_failed(self, op: str, exc: Exception) -> None:
        log.warning("baidu backend %s: token store %s failed (%s); using a per-process token",
                    self._backend, op, type(exc).__name__)


class SigningAuth:
    """AK/SK mode: sign each outgoing request in place."""

    def __init__(self, access_key: str, secret_key: str, expiration: int) -> None:
        self._ak = access_key
        self._sk = secret_key
        self._expiration = expiration

    def sign(self, request: httpx.Request, now: float | None = None) -> None:
        stamp = canonical_time(time.time() if now is None else now)
        request.headers["x-bce-date"] = stamp
        request.headers["x-bce-content-sha256"] = hashlib.sha256(request.content).hexdigest()
        sig = sign(
            request.method, request.url.path, request.url.params.multi_items(), request.headers,
            access_key=self._ak, secret_key=self._sk, timestamp=stamp,
            expiration=self._expiration, headers_to_sign=SIGNED_HEADERS,
        )
        request.headers["Authorization"] = sig.authorization


class RedactingFilter(logging.Filter):
    """httpx logs every request URL at INFO; in access_token mode the URL carries the token
    (and for the token endpoint, the secret). Rewrites such records before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction() -> None:
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
