"""The emulator is faithful enough for Baidu's own client: the official qianfan SDK (token mode
and IAM-signed mode, where it lists the signed headers unsorted) works against it unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import qianfan

from adapters.baidu.emulator import (
    DEMO_ACCESS_KEY,
    DEMO_API_KEY,
    DEMO_IAM_SECRET,
    DEMO_SECRET_KEY,
    BaiduEmulator,
    create_emulator,
)
from adapters.loopback import LoopbackServer


@pytest.fixture(scope="module")
def emu() -> Iterator[BaiduEmulator]:
    app = create_emulator()
    with LoopbackServer(app) as server:
        config = qianfan.get_config()
        saved = (config.BASE_URL, config.CONSOLE_API_BASE_URL)
        config.BASE_URL = config.CONSOLE_API_BASE_URL = server.url
        try:
            yield app
        finally:
            config.BASE_URL, config.CONSOLE_API_BASE_URL = saved


def test_qianfan_sdk_in_token_mode_chats_and_streams(emu: BaiduEmulator) -> None:
    chat = qianfan.ChatCompletion(ak=DEMO_API_KEY, sk=DEMO_SECRET_KEY, endpoint="llama_3_8b")
    assert chat.do(messages=[{"role": "user", "content": "hi sdk"}]).body["result"] == "Hello! You said: hi sdk"
    pieces = [r.body["result"] for r in chat.do(messages=[{"role": "user", "content": "a b c d e f g"}],
                                               stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == "Hello! You said: a b c d e f g"
    assert "access_token" in emu.received[-1].query


def test_qianfan_sdk_in_iam_mode_passes_signature_verification(emu: BaiduEmulator) -> None:
    chat = qianfan.ChatCompletion(access_key=DEMO_ACCESS_KEY, secret_key=DEMO_IAM_SECRET, endpoint="llama_3_8b")
    assert chat.do(messages=[{"role": "user", "content": "hi iam"}]).body["result"] == "Hello! You said: hi iam"
    rec = emu.received[-1]
    assert rec.headers["authorization"].startswith(f"bce-auth-v1/{DEMO_ACCESS_KEY}/") and rec.outcome == 0


def test_qianfan_sdk_with_a_wrong_iam_secret_is_refused(emu: BaiduEmulator) -> None:
    chat = qianfan.ChatCompletion(access_key=DEMO_ACCESS_KEY, secret_key="wrong", endpoint="llama_3_8b")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        chat.do(messages=[{"role": "user", "content": "x"}])
    assert emu.received[-1].outcome == 403
