"""The `kind: replicate` backend configuration.

One backend is one model: either an official model by name (`model: meta/meta-llama-3-8b-instruct`,
created with `POST /v1/models/{owner}/{name}/predictions`) or a pinned version
(`version: owner/name:version_id`, created with `POST /v1/predictions`).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from adapters.base import BackendConfig, Timeouts

_MODEL = re.compile(r"^[\w.-]+/[\w.-]+$")
_VERSION = re.compile(r"^(?:[\w.-]+/[\w.-]+:)?[0-9a-f]{64}$")


class ReplicateTimeouts(Timeouts, forbid_unknown_fields=True):
    """`cold_boot` bounds the time a prediction may sit in `starting` (a model booting);
    `generation` bounds the time from `processing` to a terminal status. Both end in a cancel."""

    cold_boot: float = 180.0
    generation: float = 300.0


class ReplicateBackend(BackendConfig, tag="replicate", kw_only=True):
    api_token: str
    model: str | None = None
    version: str | None = None
    deployment: str | None = None
    """owner/name of a Replicate deployment (the account's own hardware running a model)."""
    base_url: str = "https://api.replicate.com"
    """The API root without `/v1`."""
    wait_seconds: int = 60
    """`Prefer: wait=N` for non-streaming requests (1-60; capped by `timeout.cold_boot`)."""
    timeout: ReplicateTimeouts = msgspec.field(default_factory=ReplicateTimeouts)
    lifetime: float | None = None
    """Seconds after which Replicate itself cancels the prediction (`Cancel-After`)."""
    input_defaults: dict[str, Any] = {}
    """Model inputs sent with every request, under whatever the client sets."""

    def __post_init__(self) -> None:
        if not self.api_token:
            raise ValueError("api_token is required (a Replicate API token, r8_...)")
        if sum(x is not None for x in (self.model, self.version, self.deployment)) != 1:
            raise ValueError("give exactly one of model (owner/name), version (owner/name:version_id) "
                             "or deployment (owner/name)")
        if self.model is not None and not _MODEL.match(self.model):
            raise ValueError(f"model: expected owner/name, got {self.model!r}")
        if self.deployment is not None and not _MODEL.match(self.deployment):
            raise ValueError(f"deployment: expected owner/name, got {self.deployment!r}")
        if self.version is not None and not _VERSION.match(self.version):
            raise ValueError(f"version: expected owner/name:<64 hex> or <64 hex>, got {self.version!r}")
        if not self.base_url.startswith(("http://", "https://")) or self.base_url.rstrip("/").endswith("/v1"):
            raise ValueError(f"base_url: expected the API root without /v1, got {self.base_url!r}")
        if not 1 <= self.wait_seconds <= 60:
            raise ValueError("wait_seconds must be between 1 and 60 (Replicate's Prefer: wait range)")
        if self.lifetime is not None and self.lifetime <= 0:
            raise ValueError("lifetime must be a positive number of seconds")
        if "prompt" in self.input_defaults:
            raise ValueError("input_defaults may not set prompt (it comes from each request)")

    @property
    def target(self) -> str:
        """The model, version or deployment this backend runs, for messages."""
        return self.model or self.version or (f"deployment {self.deployment}" if self.deployment else "")

    def __repr__(self) -> str:
        # Never let the token reach a log line through a repr of the config.
        return f"ReplicateBackend(target={self.target!r}, base_url={self.base_url!r}, api_token=***)"
