"""bce-auth-v1: the spec's worked examples byte for byte, agreement with Baidu's own signer,
and verification that refuses anything changed after signing."""

from __future__ import annotations

import random
import string

import pytest
from baidubce.auth.bce_credentials import BceCredentials
from baidubce.auth.bce_v1_signer import sign as bce_sign

from adapters.baidu.signer import (
    SignatureRejected,
    canonical_time,
    parse_time,
    sign,
    uri_encode,
    verify,
)

CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/llama_3_8b"
EXAMPLE_A_HEADERS = {
    "Host": "bj.bcebos.com", "Content-Type": "text/plain", "Content-Length": "8",
    "Content-Md5": "NFzcPqhviddjRNnSOGo4rw==", "x-bce-date": "2015-04-27T08:23:49Z",
}
EXAMPLE_A_QUERY = {"partNumber": "9", "uploadId": "a44cc9bab11cbd156984767aad637851"}
EXAMPLE_B_HEADERS = {
    "Content-Type": "application/json", "Host": "aip.baidubce.com",
    "Request_id": "sdk-py-0.4.12-AbCdEfGhIjKlMnOp", "x-bce-date": "2024-05-01T12:00:00Z",
}


def example_a(path: str = "/v1/test/myfolder/readme.txt"):
    return sign("PUT", path, EXAMPLE_A_QUERY, EXAMPLE_A_HEADERS, access_key="a" * 32, secret_key="b" * 32,
                timestamp="2015-04-27T08:23:49Z", expiration=1800)


def test_example_a_baidus_published_vector_reproduces_byte_for_byte() -> None:
    s = example_a()
    assert s.auth_string_prefix == "bce-auth-v1/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/2015-04-27T08:23:49Z/1800"
    assert s.signing_key == "1d5ce5f464064cbee060330d973218821825ac6952368a482a592e6615aef479"
    assert s.canonical_request == (
        "PUT\n/v1/test/myfolder/readme.txt\n"
        "partNumber=9&uploadId=a44cc9bab11cbd156984767aad637851\n"
        "content-length:8\ncontent-md5:NFzcPqhviddjRNnSOGo4rw%3D%3D\ncontent-type:text%2Fplain\n"
        "host:bj.bcebos.com\nx-bce-date:2015-04-27T08%3A23%3A49Z"
    )
    assert s.signature == "d74a04362e6a848f5b39b15421cb449427f419c95a480fd6b8cf9fc783e2999e"
    assert s.authorization == (
        "bce-auth-v1/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/2015-04-27T08:23:49Z/1800//"
        "d74a04362e6a848f5b39b15421cb449427f419c95a480fd6b8cf9fc783e2999e"
    )


def test_example_a_with_the_shorter_path_gives_the_published_signature() -> None:
    assert example_a("/test/myfolder/readme.txt").signature == (
        "1816c10fce34ba9c9825eddc05fd6058bf82e05fefeddee8da6f869486ea68c0")


def test_example_b_qianfan_chat_request_signing_all_headers() -> None:
    s = sign("POST", CHAT, {}, EXAMPLE_B_HEADERS, access_key="ak_example", secret_key="sk_example",
             timestamp="2024-05-01T12:00:00Z", expiration=300, headers_to_sign=list(EXAMPLE_B_HEADERS))
    assert s.auth_string_prefix == "bce-auth-v1/ak_example/2024-05-01T12:00:00Z/300"
    assert s.signing_key == "3fd6a51e7fd5272dc1022864812e9e20ead96a25651c7d6eb8745de518924fad"
    assert s.canonical_request == (
        "POST\n/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/llama_3_8b\n\ncontent-type:application%2Fjson\n"
        "host:aip.baidubce.com\nrequest_id:sdk-py-0.4.12-AbCdEfGhIjKlMnOp\nx-bce-date:2024-05-01T12%3A00%3A00Z"
    )
    assert s.authorization == (
        "bce-auth-v1/ak_example/2024-05-01T12:00:00Z/300/content-type;host;request_id;x-bce-date/"
        "186e2dc4b593532f02fbb85e4df680a1178459059df1dfca9aa338b6f3d32c3f"
    )


def test_example_b_minimal_variant_signing_host_and_date_only() -> None:
    s = sign("POST", CHAT, {}, EXAMPLE_B_HEADERS, access_key="ak_example", secret_key="sk_example",
             timestamp="2024-05-01T12:00:00Z", expiration=300, headers_to_sign=["host", "x-bce-date"])
    assert s.authorization == (
        "bce-auth-v1/ak_example/2024-05-01T12:00:00Z/300/host;x-bce-date/"
        "bbcfe8a2c4feced91cd056452ba88afbe3caeb369fe0dc9cacdba961b52d8145"
    )


def test_example_b_with_a_query_string() -> None:
    headers = {"Host": "iam.bj.baidubce.com", "x-bce-date": "2024-05-01T12:00:00Z"}
    s = sign("GET", "/v1/BCE-BEARER/token", {"expireInSeconds": "43200"}, headers,
             access_key="ak_example", secret_key="sk_example", timestamp="2024-05-01T12:00:00Z",
             expiration=300, headers_to_sign=["host", "x-bce-date"])
    assert s.canonical_request == (
        "GET\n/v1/BCE-BEARER/token\nexpireInSeconds=43200\nhost:iam.bj.baidubce.com\n"
        "x-bce-date:2024-05-01T12%3A00%3A00Z"
    )
    assert s.authorization.endswith("/300/host;x-bce-date/"
                                    "d8d6f12a53cb336a4ea1113ded95277732813b5592889628aa93c2710500525a")


def test_uri_encode_keeps_only_unreserved_bytes_and_uses_uppercase_hex() -> None:
    assert uri_encode("a b*!'()~-_.") == "a%20b%2A%21%27%28%29~-_."
    assert uri_encode("/x/y", encode_slash=False) == "/x/y"
    assert uri_encode("/x/y") == "%2Fx%2Fy"
    assert uri_encode("é") == "%C3%A9"


def test_canonical_time_round_trips() -> None:
    assert canonical_time(1714564800) == "2024-05-01T12:00:00Z"
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800


def _random_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("seed", range(25))
def test_signatures_agree_with_baidus_official_python_signer(seed: int) -> None:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + " -_.~*!'()/:=&%é中"
    path = "/" + "/".join(_random_text(rng, string.ascii_letters + string.digits + "-_.~", 5) for _ in range(3))
    query = {_random_text(rng, string.ascii_letters, 4): _random_text(rng, chars, 6) for _ in range(rng.randint(0, 3))}
    headers = {"Host": f"127.0.0.1:{rng.randint(1000, 65000)}", "Content-Type": "application/json",
               "x-bce-date": "2024-05-01T12:00:00Z", "X-Custom": _random_text(rng, chars, 8)}
    names = rng.choice([None, ["host", "x-bce-date"], [k.lower() for k in headers]])
    ts = 1714564800
    mine = sign("POST", path, query, headers, access_key="ak-" + str(seed), secret_key="sk-" + str(seed),
                timestamp=canonical_time(ts), expiration=300, headers_to_sign=names)
    theirs = bce_sign(
        BceCredentials(("ak-" + str(seed)).encode(), ("sk-" + str(seed)).encode()), b"POST",
        uri_encode(path, encode_slash=False).encode(),
        {k.encode(): v for k, v in headers.items()}, {k.encode(): v for k, v in query.items()},
        timestamp=ts, expiration_in_seconds=300,
        headers_to_sign=None if names is None else [n.encode() for n in sorted(names)],
    ).decode()
    assert mine.authorization == theirs


NOW = 1714564800.0


def _signed(**changes: object) -> dict:
    headers = {"host": "127.0.0.1:8123", "content-type": "application/json", "x-bce-date": canonical_time(NOW)}
    s = sign("POST", CHAT, {"a": "1"}, headers, access_key="ak", secret_key="sk",
             timestamp=canonical_time(NOW), headers_to_sign=["host", "content-type", "x-bce-date"])
    req = {"method": "POST", "path": CHAT, "query": {"a": "1"},
           "headers": {**headers, "authorization": s.authorization}}
    req.update(changes)
    return req


def _verify(req: dict, now: float = NOW) -> None:
    verify(req["method"], req["path"], req["query"], req["headers"], secret_for={"ak": "sk"}, now=now)


def test_verify_accepts_an_untouched_request_and_lists_signed_headers_in_sorted_order() -> None:
    _verify(_signed())
    req = _signed()
    auth = req["headers"]["authorization"].split("/")
    auth[4] = "x-bce-date;host;content-type"  # the Python SDK lists them unsorted
    req["headers"]["authorization"] = "/".join(auth)
    _verify(req)


@pytest.mark.parametrize("change", [
    {"path": CHAT.replace("llama_3_8b", "llama_3_70b")},
    {"query": {"a": "2"}},
    {"method": "PUT"},
])
def test_verify_refuses_a_request_altered_after_signing(change: dict) -> None:
    with pytest.raises(SignatureRejected) as exc:
        _verify(_signed(**change))
    assert exc.value.code == "SignatureDoesNotMatch" and exc.value.status == 403


def test_verify_refuses_an_altered_date_header() -> None:
    req = _signed()
    req["headers"]["x-bce-date"] = canonical_time(NOW + 1)
    with pytest.raises(SignatureRejected) as exc:
        _verify(req)
    assert exc.value.code == "SignatureDoesNotMatch"


def test_verify_refuses_a_stale_or_future_timestamp() -> None:
    with pytest.raises(SignatureRejected) as exc:
        _verify(_signed(), now=NOW + 300 + 300 + 1)
    assert exc.value.code == "RequestExpired"
    with pytest.raises(SignatureRejected):
        _verify(_signed(), now=NOW - 301)


def test_verify_refuses_an_unknown_access_key_and_a_wrong_secret() -> None:
    req = _signed()
    with pytest.raises(SignatureRejected) as exc:
        verify("POST", CHAT, req["query"], req["headers"], secret_for={}, now=NOW)
    assert (exc.value.code, exc.value.status) == ("NotFound", 401)
    assert "Could not find credential" in exc.value.message
    with pytest.raises(SignatureRejected) as exc:
        verify("POST", CHAT, req["query"], req["headers"], secret_for={"ak": "other"}, now=NOW)
    assert exc.value.code == "SignatureDoesNotMatch"


def test_verify_refuses_a_malformed_authorization() -> None:
    req = _signed()
    req["headers"]["authorization"] = "Bearer abc"
    with pytest.raises(SignatureRejected) as exc:
        _verify(req)
    assert exc.value.code == "InvalidHTTPAuthHeader"
