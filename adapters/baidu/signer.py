"""BCE auth v1 (`bce-auth-v1`) request signing and verification, as pure functions.

The adapter signs outgoing requests with `sign`; the emulator (and the gateway's
Baidu-compatible front door) check incoming ones with `verify`. Nothing here does I/O or reads
a clock: the timestamp and the current time are arguments, so the spec's worked examples
reproduce byte for byte.

Algorithm (../shared/specs/baidu_wenxinworkshop.md §3):
  authStringPrefix = bce-auth-v1/{AK}/{timestamp}/{expiration}
  signingKey       = hex(HMAC-SHA256(SK, authStringPrefix))
  CanonicalRequest = METHOD \\n UriEncode(path, keep /) \\n sorted query \\n sorted headers
  signature        = hex(HMAC-SHA256(signingKey as ASCII, CanonicalRequest))
  Authorization    = {authStringPrefix}/{signed header names, sorted, ;-joined}/{signature}

Headers whose value is empty are left out of the canonical form, as the official Python and
Go signers do.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "bce-auth-v1"
DEFAULT_SIGNED = frozenset({"host", "content-length", "content-type", "content-md5"})
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")

Query = Mapping[str, str] | Iterable[tuple[str, str]]


def uri_encode(s: str, encode_slash: bool = True) -> str:
    """Percent-encode every UTF-8 byte except `A-Z a-z 0-9 - _ . ~` (and `/` when
    `encode_slash` is false), with uppercase hex; space is `%20`, never `+`."""
    out: list[str] = []
    for b in s.encode("utf-8"):
        if b in _UNRESERVED or (b == 0x2F and not encode_slash):
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


def canonical_time(epoch: float) -> str:
    """`YYYY-MM-DDThh:mm:ssZ` in UTC, the format of `x-bce-date` and of the auth string."""
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def canonical_uri(path: str) -> str:
    return uri_encode(path or "/", encode_slash=False)


def canonical_query(query: Query) -> str:
    pairs = query.items() if isinstance(query, Mapping) else query
    parts = sorted(
        f"{uri_encode(k)}={uri_encode(v or '')}" for k, v in pairs if k.lower() != "authorization"
    )
    return "&".join(parts)


def canonical_headers(headers: Mapping[str, str], names: Iterable[str]) -> tuple[str, list[str]]:
    """The canonical header block for `names`, and the names that actually took part (sorted;
    names whose header is missing or empty are left out)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    used: list[str] = []
    lines: list[str] = []
    for name in sorted({n.strip().lower() for n in names}):
        value = lowered.get(name, "").strip()
        if not value:
            continue
        used.append(name)
        lines.append(f"{uri_encode(name)}:{uri_encode(value)}")
    lines.sort()
    return "\n".join(lines), used


def _names_to_sign(headers: Mapping[str, str], headers_to_sign: Iterable[str] | None) -> set[str]:
    bce = {k.lower() for k in headers if k.lower().startswith("x-bce-")}
    chosen = {n.lower() for n in headers_to_sign or ()}
    return (chosen or set(DEFAULT_SIGNED)) | bce


def canonical_request(method: str, path: str, query: Query, header_block: str) -> str:
    return "\n".join((method.upper(), canonical_uri(path), canonical_query(query), header_block))


def _hmac_hex(key: bytes, msg: str) -> str:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class BceSignature:
    auth_string_prefix: str
    signing_key: str
    canonical_request: str
    signed_headers: str
    signature: str

    @property
    def authorization(self) -> str:
        return f"{self.auth_string_prefix}/{self.signed_headers}/{self.signature}"


def sign(
    method: str,
    path: str,
    query: Query,
    headers: Mapping[str, str],
    *,
    access_key: str,
    secret_key: str,
    timestamp: str,
    expiration: int = 300,
    headers_to_sign: Iterable[str] | None = None,
) -> BceSignature:
    """Sign one request. `headers` are the headers as sent (with `host` including a
    non-default port). `headers_to_sign` None or empty -> the default set (host,
    content-length, content-type, content-md5) and an empty signed-headers field; otherwise
    exactly those names. Any `x-bce-*` header present is always signed."""
    prefix = f"{PREFIX}/{access_key}/{timestamp}/{expiration}"
    signing_key = _hmac_hex(secret_key.encode("utf-8"), prefix)
    block, used = canonical_headers(headers, _names_to_sign(headers, headers_to_sign))
    creq = canonical_request(method, path, query, block)
    listed = ";".join(used) if headers_to_sign else ""
    return BceSignature(prefix, signing_key, creq, listed, _hmac_hex(signing_key.encode("ascii"), creq))


class SignatureRejected(Exception):
    """An incoming signature failed. `code` and `status` are what BCE's IAM answers with
    (sent as `X-Bce-Error-Code` / `X-Bce-Error-Message`); `message` names no secret."""

    def __init__(self, code: str, cause: str, status: int) -> None:
        super().__init__(f"{code}, cause: {cause}")
        self.code = code
        self.status = status
        self.message = f"{code}, cause: {cause}"


@dataclass(frozen=True)
class ParsedAuthorization:
    access_key: str
    timestamp: str
    expiration: int
    signed_headers: list[str]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization:
    parts = value.strip().split("/")
    if len(parts) != 6 or parts[0] != PREFIX:
        raise SignatureRejected("InvalidHTTPAuthHeader", "Authorization is not bce-auth-v1/...", 401)
    _, ak, ts, exp, listed, signature = parts
    try:
        parse_time(ts)
        expiration = int(exp)
    except ValueError:
        raise SignatureRejected("InvalidHTTPAuthHeader", "bad timestamp or expiration", 401) from None
    names = [n for n in listed.split(";") if n]
    return ParsedAuthorization(ak, ts, expiration, names, signature)


def verify(
    method: str,
    path: str,
    query: Query,
    headers: Mapping[str, str],
    *,
    secret_for: Mapping[str, str],
    now: float,
    skew: float = 300.0,
) -> ParsedAuthorization:
    """Check the `Authorization` header of an incoming request; return its parts or raise
    `SignatureRejected` (unknown AK, stale or future date, signature mismatch).

    The listed header names are used in sorted order whatever order the client sent them in
    (the Python SDK lists them unsorted); an empty list means the default set."""
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = parse_authorization(lowered.get("authorization", ""))
    secret = secret_for.get(auth.access_key)
    if secret is None:
        raise SignatureRejected("NotFound", "Could not find credential.", 401)
    for stamp in (auth.timestamp, lowered.get("x-bce-date") or auth.timestamp):
        try:
            at = parse_time(stamp)
        except ValueError:
            raise SignatureRejected("InvalidHTTPAuthHeader", "bad x-bce-date", 401) from None
        if now > at + auth.expiration + skew or at > now + skew:
            raise SignatureRejected("RequestExpired", "Request has expired. Timestamp: " + stamp, 403)
    prefix = f"{PREFIX}/{auth.access_key}/{auth.timestamp}/{auth.expiration}"
    signing_key = _hmac_hex(secret.encode("utf-8"), prefix)
    names = auth.signed_headers or _names_to_sign(lowered, None)
    block, _ = canonical_headers(lowered, names)
    expected = _hmac_hex(signing_key.encode("ascii"), canonical_request(method, path, query, block))
    if not hmac.compare_digest(expected, auth.signature):
        raise SignatureRejected("SignatureDoesNotMatch", "Fail to authn user: Signature does not match", 403)
    return auth
