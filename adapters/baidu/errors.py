"""Baidu `error_code`s (delivered as HTTP 200) and IAM rejections, mapped onto `UpstreamError`.

| error_code                          | client sees                                          |
|-------------------------------------|------------------------------------------------------|
| 4, 18, 336501, 336502               | 429 rate_limit_exceeded, retryable                   |
| 1, 2, 15, 336000, 336100            | 503 upstream_unavailable, retryable                  |
| 336001-336003, 336006, 336007,      | 400 invalid_request, Baidu's own message             |
|   336104, 336105                    |                                                      |
| 6, 13, 14, 100, 110, 111, 336004    | 502 upstream_auth_error: the gateway's credentials   |
| 17, 19                              | 429 upstream_quota_exhausted, not retryable          |
| 3, 336005                           | 502 upstream_endpoint_not_found (configuration)      |
| anything else                       | 502 upstream_error, not retryable                    |

Messages never carry a token or a key: `redact` strips `access_token`, `client_id` and
`client_secret` values from any text (URLs in httpx errors and logs included).
"""

from __future__ import annotations

import re

from adapters.types import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamUnavailable,
)

RATE_LIMITED = frozenset({4, 18, 336501, 336502})
TRANSIENT = frozenset({1, 2, 15, 336000, 336100})
INVALID = frozenset({336001, 336002, 336003, 336006, 336007, 336104, 336105})
CREDENTIALS = frozenset({6, 13, 14, 100, 110, 111, 336004})
TOKEN_REFRESH = frozenset({110, 111})
QUOTA = frozenset({17, 19})
NOT_FOUND = frozenset({3, 336005})

_SECRET_PARAM = re.compile(r"(access_token|client_secret|client_id)=[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1=***", text)


def from_error_code(code: int, msg: str, backend: str) -> UpstreamError:
    """The `UpstreamError` for a Baidu `{error_code, error_msg}` body."""
    msg = redact(msg)
    said = f"(error_code {code}: {msg})"
    if code in RATE_LIMITED:
        return UpstreamRateLimited(f"Baidu backend {backend!r} is rate limited {said}", retry_after=1.0)
    if code in TRANSIENT:
        return UpstreamUnavailable(f"Baidu backend {backend!r} is temporarily unavailable {said}", status=503)
    if code in INVALID:
        return UpstreamBadRequest(f"Baidu rejected the request: {msg} (error_code {code})")
    if code in CREDENTIALS:
        return UpstreamAuthError(
            f"Baidu backend {backend!r} refused the gateway's credentials {said}; "
            "check the backend's api_key/secret_key or access_key/secret_key and the app's permissions"
        )
    if code in QUOTA:
        return UpstreamQuotaExhausted(f"Baidu backend {backend!r} has used up its quota {said}")
    if code in NOT_FOUND:
        return UpstreamError(
            f"Baidu backend {backend!r}: the configured endpoint does not exist {said}",
            code="upstream_endpoint_not_found",
        )
    return UpstreamError(f"Baidu backend {backend!r} failed {said}")


def from_iam_rejection(status: int, bce_code: str, bce_message: str, backend: str) -> UpstreamError:
    """A non-2xx answer from BCE IAM (AK/SK mode): `X-Bce-Error-Code` / `X-Bce-Error-Message`."""
    said = redact(bce_message or bce_code or f"HTTP {status}")
    if status in (401, 403):
        return UpstreamAuthError(
            f"Baidu backend {backend!r} refused the gateway's AK/SK signature ({said}); "
            "check the backend's access_key/secret_key and the host clock"
        )
    if status == 429:
        return UpstreamRateLimited(f"Baidu backend {backend!r} is rate limited (HTTP 429: {said})")
    if status >= 500:
        return UpstreamUnavailable(f"Baidu backend {backend!r} answered HTTP {status} ({said})")
    return UpstreamError(f"Baidu backend {backend!r} answered HTTP {status} ({said})")
