"""The one family of errors the gateway answers with. Each inbound dialect renders them
(gateway/inbound/openai.py: OpenAI error objects; gateway/inbound/baidu.py: error_code/error_msg)."""

from __future__ import annotations

from typing import Any

from adapters.types import UpstreamError


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.headers = headers or {}
        self.meta: Any = None  # the pipeline's CallMeta, when the error happened in a call


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RateLimited(GatewayError):
    """A gateway rate limit (rpm, tpm, concurrency) refused the request."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str = "rpm", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.limit = limit  # rpm | tpm | concurrency (Baidu door maps rpm/concurrency->18, tpm->4)


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class StoreUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class UpstreamFailed(GatewayError):
    """A backend failure, carried to the client with the status the adapter chose."""

    type = "upstream_error"

    def __init__(self, err: UpstreamError) -> None:
        super().__init__(err.message, code=err.code, status=err.status, retry_after=err.retry_after)
        self.upstream = err
        if err.status == 429:
            self.type = "rate_limit_error"
        elif err.status == 400:
            self.type = "invalid_request_error"
        else:
            self.type = "server_error"
