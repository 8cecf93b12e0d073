"""`llm-gateway demo`: the gateway on loopback in front of the built-in emulators.

No backend, Redis or config file is needed: the emulators run in background threads, the
store is in-process, and a fresh key is printed with ready-to-paste snippets.
"""

from __future__ import annotations

import secrets
from typing import Any

from adapters.loopback import LoopbackServer
from gateway.config import parse_config


def _emulators() -> tuple[list[LoopbackServer], dict[str, Any]]:
    """Start every emulator that exists; return the servers and the backends to route to."""
    from adapters.openai.emulator import create_emulator

    servers: list[LoopbackServer] = []
    backends: dict[str, Any] = {}
    openai = LoopbackServer(create_emulator(model="meta-llama/Meta-Llama-3-8B-Instruct")).start()
    servers.append(openai)
    backends["vllm-emulator"] = {"kind": "openai", "base_url": openai.url + "/v1",
                                 "model": "meta-llama/Meta-Llama-3-8B-Instruct"}
    for extra in _vendor_emulators():
        server, name, backend = extra
        servers.append(server)
        backends[name] = backend
    return servers, backends


def _vendor_emulators() -> list[tuple[LoopbackServer, str, dict[str, Any]]]:
    """Replicate and Baidu emulators, when those adapters are installed."""
    found: list[tuple[LoopbackServer, str, dict[str, Any]]] = []
    try:
        from adapters.replicate.emulator import demo_backend as replicate_demo
    except ImportError:
        replicate_demo = None
    try:
        from adapters.baidu.emulator import demo_backend as baidu_demo
    except ImportError:
        baidu_demo = None
    for make in (replicate_demo, baidu_demo):
        if make is not None:
            found.extend(make())
    return found


def demo_config_text(backends: dict[str, Any], key: str, admin_key: str) -> str:
    import msgspec

    models: dict[str, Any] = {"llama-3-8b": {"targets": [{"backend": "vllm-emulator"}]}}
    for name in backends:
        if name != "vllm-emulator":
            models[name] = {"targets": [{"backend": name}]}
    doc = {
        "store": {"url": "memory://"},
        "backends": backends,
        "models": models,
        "keys": [{"name": "demo-app", "key": key, "user": "demo"}],
        "admin": {"key": admin_key},
    }
    return msgspec.json.encode(doc).decode()  # JSON is YAML


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> int:
    import uvicorn

    from gateway.app import create_app

    servers, backends = _emulators()
    key = "sk-demo-" + secrets.token_hex(8)
    admin_key = "sk-admin-" + secrets.token_hex(8)
    config = parse_config(demo_config_text(backends, key, admin_key), "<demo>")
    url = f"http://{host}:{port}"
    aliases = ", ".join(config.models)
    print(f"""
llm-gateway demo: {url}  (in-process store, emulated backends)
  aliases:   {aliases}
  key:       {key}
  admin key: {admin_key}

curl {url}/v1/chat/completions \\
  -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
  -d '{{"model": "llama-3-8b", "messages": [{{"role": "user", "content": "Hello there"}}]}}'

python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="{key}")
r = client.chat.completions.create(model="llama-3-8b", messages=[{{"role": "user", "content": "Hello there"}}])
print(r.choices[0].message.content, r.usage)
for chunk in client.chat.completions.create(model="llama-3-8b", stream=True,
        messages=[{{"role": "user", "content": "Stream to me"}}]):
    print((chunk.choices[0].delta.content or "") if chunk.choices else "", end="", flush=True)
print()
EOF

Ctrl-C stops the demo.
""", flush=True)
    try:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
    finally:
        for server in servers:
            server.stop()
    return 0
