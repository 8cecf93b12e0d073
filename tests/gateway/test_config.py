"""Config: typed, strict, interpolated, and every error names where it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from tests.support import ROOT

BASE = """\
backends:
  local-vllm:
    kind: openai
    base_url: ${VLLM_URL:-http://127.0.0.1:8000/v1}
    model: meta-llama/Meta-Llama-3-8B-Instruct
    api_key: ${VLLM_API_KEY:-}
    timeout: {connect: 2, read: 60}
models:
  llama-3-8b:
    targets: [{backend: local-vllm}]
keys:
  - {name: alice-app, key: ${ALICE_KEY}, user: alice, models: [llama-3-8b]}
"""


def test_interpolation_fills_variables_and_defaults() -> None:
    cfg = parse_config(BASE, env={"ALICE_KEY": "sk-a:b}#c", "VLLM_API_KEY": "tok"})
    backend = cfg.backends["local-vllm"]
    assert backend.base_url == "http://127.0.0.1:8000/v1"
    assert backend.api_key == "tok"
    assert cfg.keys[0].key == "sk-a:b}#c"  # YAML-special characters stay one value
    assert backend.timeout.connect == 2 and backend.timeout.read == 60


def test_a_missing_variable_without_default_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"<config>:12: environment variable ALICE_KEY is not set"):
        parse_config(BASE, env={})


@pytest.mark.parametrize(("change", "expected"), [
    (("model: meta", "modle: meta"), r":5: backends\.local-vllm\.modle: unknown key"),
    (("kind: openai", "kind: openia"), r":3: backends\.local-vllm\.kind: .*expected one of .*openai"),
    (("read: 60", "read: soon"), r":7: backends\.local-vllm\.timeout\.read: Expected `float`"),
    (("user: alice", "usr: alice"), r":12: keys\[0\]\.usr: unknown key"),
    (("backend: local-vllm", "backend: nowhere"), r"models\.llama-3-8b\.targets\[0\]\.backend: no backend"),
    (("models: [llama-3-8b]", "models: [llama]"), r"keys\[0\]: no model alias named 'llama'"),
])
def test_errors_name_file_line_and_key_path(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(BASE.replace(*change), env={"ALICE_KEY": "k"})


def test_key_and_key_sha256_are_exclusive() -> None:
    text = BASE.replace("key: ${ALICE_KEY}", "key: k, key_sha256: " + "0" * 64)
    with pytest.raises(ConfigError, match=r"keys\[0\]: give exactly one of key or key_sha256"):
        parse_config(text, env={})


def test_check_command_fails_on_a_typo_and_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("timeout:", "timout:"))
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(path)],
                       capture_output=True, text=True, cwd=ROOT, env={"ALICE_KEY": "k", "PATH": ""})
    assert r.returncode == 2
    assert f"{path}:7: backends.local-vllm.timout: unknown key" in r.stderr


def test_check_command_prints_the_alias_table(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(BASE)
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(path)],
                       capture_output=True, text=True, cwd=ROOT, env={"ALICE_KEY": "k", "PATH": ""})
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("llama-3-8b"))
    assert "priority" in row and "local-vllm(openai)" in row and "connect=2" in row


def test_every_example_config_in_the_repo_loads() -> None:
    examples = sorted((ROOT / "config").glob("*.yaml"))
    assert examples
    for path in examples:
        # every variable the example needs without a default, set as an operator would
        needed = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())
        load_config(path, env={name: f"value-of-{name.lower()}" for name in needed})
