"""Backend kinds: each vendor package exports its config Struct (`Backend`) and `build`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.base import Adapter, AdapterContext, BackendConfig


def _kinds() -> dict[type[BackendConfig], Callable[[Any, AdapterContext], Adapter]]:
    from adapters import baidu, openai, replicate

    kinds: dict[type[BackendConfig], Callable[[Any, AdapterContext], Adapter]] = {
        openai.Backend: openai.build,
        baidu.Backend: baidu.build,
        replicate.Backend: replicate.build,
    }
    return kinds


BACKEND_KINDS = _kinds()


def build_adapter(cfg: BackendConfig, ctx: AdapterContext) -> Adapter:
    return BACKEND_KINDS[type(cfg)](cfg, ctx)
