"""Replicate's HTTP and prediction failures as `UpstreamError`s.

Messages name the backend and the model, carry Replicate's `detail` where it helps the caller,
and never include the API token (it only ever travels in a request header).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx
import msgspec

from adapters.replicate.wire import problem_decoder
from adapters.types import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

# cog-triton's backend failures (E2100-E2104: Triton error, timeout, tokenizer, bad event)
# are worth another attempt; prompt and argument errors (E1xxx) are not.
_RETRYABLE_FAILURE_PREFIXES = ("E21",)


def retry_after(headers: httpx.Headers) -> float | None:
    """`Retry-After` as seconds: digits, or an HTTP date (capped at 60 s, as the clients do)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(60.0, max(0.0, when - time.time()))


def problem_detail(raw: bytes) -> str:
    try:
        problem = problem_decoder.decode(raw) if raw else None
    except msgspec.DecodeError:
        problem = None
    if problem is not None and (problem.detail or problem.title):
        return (problem.detail or problem.title or "").strip().removeprefix("- ").strip()
    return raw[:300].decode("utf-8", "replace").strip() or "no body"


def error_from_status(backend: str, target: str, status: int, headers: httpx.Headers, raw: bytes,
                      *, creating: bool) -> UpstreamError:
    """Map a non-2xx answer. `creating`: the request was a create (404 then means the model)."""
    detail = problem_detail(raw)
    if status in (401, 403):
        return UpstreamAuthError(
            f"backend {backend}: Replicate refused the gateway's API token (HTTP {status}); "
            "this is a gateway credential problem, not the client's")
    if status == 402:
        return UpstreamQuotaExhausted(f"backend {backend}: the Replicate account cannot pay: {detail}")
    if status == 404:
        what = f"model {target}" if creating else "prediction"
        return UpstreamError(f"backend {backend}: Replicate {what} not found: {detail}",
                             status=502, code="upstream_model_not_found", retryable=False)
    if status == 429:
        return UpstreamRateLimited(f"backend {backend}: Replicate is throttling requests: {detail}",
                                   retry_after=retry_after(headers))
    if status in (400, 413, 422):
        return UpstreamBadRequest(f"Replicate rejected the request: {detail}")
    if status in (408, 504):
        return UpstreamTimeout(f"backend {backend}: Replicate timed out (HTTP {status})")
    return UpstreamUnavailable(f"backend {backend}: Replicate answered HTTP {status}: {detail}",
                               retry_after=retry_after(headers))


def prediction_failed(backend: str, prediction_id: str, error: str | None) -> UpstreamError:
    text = (error or "no error text").strip()
    return UpstreamError(f"backend {backend}: Replicate prediction {prediction_id} failed: {text}",
                         status=502, code="upstream_prediction_failed",
                         retryable=text.startswith(_RETRYABLE_FAILURE_PREFIXES))


def prediction_canceled(backend: str, prediction_id: str) -> UpstreamError:
    return UpstreamError(f"backend {backend}: Replicate prediction {prediction_id} was canceled upstream",
                         status=502, code="upstream_canceled", retryable=True)


def transport_error(backend: str, exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        phase = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
        return UpstreamTimeout(f"backend {backend}: timed out {phase} Replicate")
    return UpstreamUnavailable(f"backend {backend}: cannot reach Replicate ({type(exc).__name__})")
