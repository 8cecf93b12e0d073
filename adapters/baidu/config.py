"""The `kind: baidu` backend configuration.

Exactly one credential pair sits flat on the backend, and which pair is present chooses the
auth mode:

- `api_key` + `secret_key`     -> access_token mode (OAuth client_credentials, token shared
                                  by every gateway process through the store);
- `access_key` + `secret_key`  -> AK/SK mode (every request signed with `bce-auth-v1`).
"""

from __future__ import annotations

from typing import Literal

from adapters.base import BackendConfig

AuthMode = Literal["access_token", "signature"]


class BaiduBackend(BackendConfig, tag="baidu"):
    endpoint: str
    """The chat endpoint suffix, e.g. `llama_3_8b` (-> `.../wenxinworkshop/chat/llama_3_8b`)."""
    base_url: str = "https://aip.baidubce.com"
    api_key: str | None = None
    secret_key: str | None = None
    access_key: str | None = None
    signature_expiration: int = 300
    """`expirationPeriodInSeconds` of each signature (the qianfan SDK uses 300)."""
    token_refresh_margin: float = 3600.0
    """Refresh the access token this long before it expires (capped at a fifth of its life)."""
    max_input_chars: int = 4800
    """Baidu's limit on the total `content` length for Llama 3 8B."""
    trim_history: bool = False
    """Over `max_input_chars`, drop the oldest turns instead of answering 400."""

    def __post_init__(self) -> None:
        if not self.endpoint or self.endpoint.strip("/") != self.endpoint:
            raise ValueError("endpoint: expected a name such as 'llama_3_8b' (no slashes at the ends)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected http(s)://host[:port], got {self.base_url!r}")
        if not self.secret_key:
            raise ValueError(
                "secret_key is required: give api_key + secret_key (access_token mode) "
                "or access_key + secret_key (AK/SK signature mode)"
            )
        if bool(self.api_key) == bool(self.access_key):
            raise ValueError(
                "give exactly one of api_key (access_token mode: api_key + secret_key) "
                "or access_key (AK/SK signature mode: access_key + secret_key)"
                + (", not both" if self.api_key else "")
            )
        if self.signature_expiration <= 0:
            raise ValueError("signature_expiration must be a positive number of seconds")
        if self.max_input_chars <= 0:
            raise ValueError("max_input_chars must be positive")

    @property
    def auth_mode(self) -> AuthMode:
        return "access_token" if self.api_key else "signature"

    def __repr__(self) -> str:
        # Never let a secret reach a log line through a repr of the config.
        key = self.api_key or self.access_key or ""
        return (
            f"BaiduBackend(endpoint={self.endpoint!r}, base_url={self.base_url!r}, "
            f"auth_mode={self.auth_mode!r}, key={key[:4]}..., secret_key=***)"
        )
