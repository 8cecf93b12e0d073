"""Gateway keys -> `Principal`: who is calling, what they may use and spend.

Keys are looked up by the SHA-256 of the presented secret, so configs may hold only the hash
(`key_sha256`) and the comparison never depends on where two secrets first differ.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from gateway.config import Config, Limits, Quota
from gateway.errors import AuthenticationFailed, ModelNotFound


class Principal(msgspec.Struct, frozen=True):
    key_name: str
    user: str
    models: frozenset[str] | None  # None: every alias
    limits: Limits | None = None
    model_limits: dict[str, Limits] = {}
    quota: Quota | None = None
    secret_sha256: str = ""

    def may_use(self, alias: str) -> bool:
        return self.models is None or alias in self.models


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRing:
    def __init__(self, config: Config) -> None:
        self._by_hash: dict[str, Principal] = {}
        self._by_name: dict[str, Principal] = {}
        self._signing_secrets: dict[str, str] = {}
        self._by_secret: dict[str, Principal] = {}
        for k in config.keys:
            if k.key:
                self._signing_secrets[k.name] = k.key
            digest = (k.key_sha256 or sha256_hex(k.key or "")).lower()
            user = config.users.get(k.user)
            p = Principal(
                key_name=k.name,
                user=k.user,
                models=frozenset(k.models) if k.models is not None else None,
                limits=k.limits,
                model_limits=dict(k.model_limits),
                quota=user.quota if user else None,
                secret_sha256=digest,
            )
            self._by_hash[digest] = p
            self._by_name[k.name] = p
        self.aliases = list(config.models)

    def by_secret(self, secret: str | None) -> Principal:
        if not secret:
            raise AuthenticationFailed("Missing API key: send Authorization: Bearer <key>.")
        p = self._by_secret.get(secret)
        if p is None:
            p = self._by_hash.get(sha256_hex(secret))
            if p is None:
                raise AuthenticationFailed("Incorrect API key provided.")
            self._by_secret[secret] = p  # only valid keys: bounded by the key count
        return p

    def by_name_and_secret(self, name: str, secret: str) -> Principal | None:
        """For the Baidu door: client_id is the key's name, client_secret the key."""
        p = self._by_name.get(name)
        if p is None or not hmac.compare_digest(p.secret_sha256, sha256_hex(secret)):
            return None
        return p

    def by_name(self, name: str) -> Principal | None:
        return self._by_name.get(name)

    def signing_secret(self, name: str) -> str | None:
        """The plain key, needed to verify a bce-auth-v1 signature (None for hashed keys)."""
        return self._signing_secrets.get(name)

    def visible_aliases(self, principal: Principal) -> list[str]:
        return [a for a in self.aliases if principal.may_use(a)]

    def check_model(self, principal: Principal, alias: str) -> None:
        if alias not in self.aliases or not principal.may_use(alias):
            raise ModelNotFound(
                f"The model `{alias}` does not exist or you do not have access to it.", param="model")
