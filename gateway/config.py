"""The gateway's YAML configuration, decoded into typed Structs that refuse unknown keys.

`${VAR}` and `${VAR:-default}` are interpolated in every string value before decoding.
Every error names the file, the line, the key path and what was expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Union

import msgspec
import yaml

from adapters.base import BackendConfig
from adapters.registry import BACKEND_KINDS

BackendUnion = Union[tuple(BACKEND_KINDS)]  # type: ignore[valid-type]  # noqa: UP007


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1


class StoreErrorPolicy(_Strict):
    """What a feature does when the store fails: `open` admits, `closed` refuses (503)."""

    limits: Literal["open", "closed"] = "open"
    quota: Literal["open", "closed"] = "closed"


class StoreConfig(_Strict):
    url: str = "memory://"
    timeout_ms: int = 250
    # how long the concurrency slots and quota reservations of a process that died outlive it
    slot_ttl: float = 30.0
    on_error: StoreErrorPolicy = msgspec.field(default_factory=StoreErrorPolicy)


class Limits(_Strict):
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


class Quota(_Strict):
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_day: int | None = None


class UserConfig(_Strict):
    quota: Quota | None = None


class KeyConfig(_Strict):
    name: str
    user: str
    key: str | None = None
    key_sha256: str | None = None
    models: list[str] | None = None  # None: every alias
    limits: Limits | None = None
    model_limits: dict[str, Limits] = {}


class RouteTarget(_Strict):
    backend: str
    weight: float = 1.0
    priority: int = 0


class Retries(_Strict):
    attempts: int = 0
    max_backoff: float = 8.0


class CacheConfig(_Strict):
    ttl: float
    shared: bool = False
    mode: Literal["deterministic", "always"] = "deterministic"


class ModelAlias(_Strict):
    targets: list[RouteTarget]
    strategy: Literal["priority", "weighted", "least-busy", "latency"] = "priority"
    fallbacks: list[str] = []
    retries: Retries = msgspec.field(default_factory=Retries)
    cache: CacheConfig | None = None
    baidu_endpoint: str | None = None
    default_max_tokens: int = 1024  # the token reservation when a request sets no max_tokens
    trim_history: bool = False


class AdminConfig(_Strict):
    key: str = ""  # empty: admin routes disabled


class BaiduInbound(_Strict):
    token_ttl: int = 2592000


class InboundConfig(_Strict):
    baidu: BaiduInbound = msgspec.field(default_factory=BaiduInbound)


class Config(_Strict):
    backends: dict[str, BackendUnion]  # type: ignore[valid-type]
    models: dict[str, ModelAlias]
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    keys: list[KeyConfig] = []
    users: dict[str, UserConfig] = {}
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)

    def backend(self, name: str) -> BackendConfig:
        return self.backends[name]


class ConfigError(Exception):
    pass


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(text: str, source: str, env: dict[str, str]) -> str:
    """Substitute `${VAR}` / `${VAR:-default}` in the YAML text, before parsing, so the
    references work anywhere, flow mappings included. A reference that is a whole scalar
    is replaced by a quoted string, so a value with YAML-special characters stays one value."""
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if line.lstrip().startswith("#") or "${" not in line:
            out.append(line)
            continue

        def sub(m: re.Match[str], line: str = line, lineno: int = lineno) -> str:
            name, default = m.group(1), m.group(2)
            if env.get(name):
                value = env[name]
            elif default is not None:
                value = default
            elif name in env:
                value = ""
            else:
                raise ConfigError(f"{source}:{lineno}: environment variable {name} is not set "
                                  f"(write ${{{name}:-default}} to give a default)")
            before = line[: m.start()].rstrip()
            after = line[m.end():].lstrip()
            whole = (not before or before[-1] in ":-[,{") and (not after or after[0] in ",}]#\r\n")
            return msgspec.json.encode(value).decode() if whole else value

        out.append(_VAR.sub(sub, line))
    return "".join(out)


_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _line_of(node: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of the YAML node at a msgspec path like `$.backends.x[0].kind`."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key, index in _PATH_PART.findall(path.removeprefix("$")):
        if key and isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if match is None:
                return line
            node, line = match, match.start_mark.line + 1
        elif index and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            node = node.value[int(index)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _explain(exc: msgspec.ValidationError, source: str, root: yaml.Node | None,
             prefix: str = "$") -> ConfigError:
    text = str(exc)
    message, _, path = text.partition(" - at `")
    path = prefix + (path.rstrip("`") or "$").removeprefix("$")
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        path = f"{path}.{unknown.group(1)}"
        message = "unknown key (check the spelling; see the config reference in README.md)"
    if path.endswith(".kind") and message.startswith("Invalid value"):
        kinds = ", ".join(sorted(k.__struct_config__.tag for k in BACKEND_KINDS))
        message = f"{message}: expected one of {kinds}"
    line = _line_of(root, path)
    where = f"{source}:{line}" if line else source
    key = path.removeprefix("$.").removeprefix("$") or "(top level)"
    return ConfigError(f"{where}: {key}: {message}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a long run of digits (a hex digest that happens to
    hold no letter, a numeric token) stays the string it was written as."""


def _int_or_digits(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    text = loader.construct_scalar(node)
    if len(text) > 18 or (len(text) > 1 and text[0] == "0" and text.isdigit()):
        return text
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_digits)

_NAMED_SECTIONS = (("backends", BackendUnion), ("models", ModelAlias), ("users", UserConfig))


def parse_config(text: str, source: str = "<config>", env: dict[str, str] | None = None) -> Config:
    text = _interpolate(text, source, dict(os.environ) if env is None else env)
    try:
        root = yaml.compose(text, Loader=_Loader)
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    # Sections keyed by name are checked entry by entry first, so that an error names the
    # entry (msgspec reports a dict value's path as `[...]`).
    for section, entry_type in _NAMED_SECTIONS:
        entries = raw.get(section)
        if isinstance(entries, dict):
            for name, value in entries.items():
                try:
                    msgspec.convert(value, entry_type, strict=False)
                except msgspec.ValidationError as exc:
                    raise _explain(exc, source, root, f"$.{section}.{name}") from None
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, source, root) from None
    problems = check_references(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(p), env)


def check_references(cfg: Config) -> list[str]:
    """Cross-references msgspec cannot check: names that must exist, pairs that must agree."""
    problems: list[str] = []
    for alias, route in cfg.models.items():
        if not route.targets:
            problems.append(f"models.{alias}.targets: at least one target is required")
        for i, t in enumerate(route.targets):
            if t.backend not in cfg.backends:
                problems.append(f"models.{alias}.targets[{i}].backend: no backend named {t.backend!r}")
        for i, fb in enumerate(route.fallbacks):
            if fb not in cfg.models and fb not in cfg.backends:
                problems.append(f"models.{alias}.fallbacks[{i}]: {fb!r} is neither an alias nor a backend")
    names: set[str] = set()
    for i, k in enumerate(cfg.keys):
        where = f"keys[{i}]"
        if (k.key is None) == (k.key_sha256 is None):
            problems.append(f"{where}: give exactly one of key or key_sha256")
        elif k.key is not None and not k.key:
            problems.append(f"{where}.key: is empty (is its environment variable set?)")
        elif k.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", k.key_sha256):
            problems.append(f"{where}.key_sha256: expected 64 hex characters")
        if k.name in names:
            problems.append(f"{where}.name: {k.name!r} is used twice")
        names.add(k.name)
        for alias in [*(k.models or ()), *k.model_limits]:
            if alias not in cfg.models:
                problems.append(f"{where}: no model alias named {alias!r}")
    return problems
