"""Usage reports for operators: `GET /admin/usage?user=&alias=&from=&to=` (admin key) and
the table `llm-gateway usage` prints.

The route is mounted by gateway/app.py, which checks the admin key; this module turns the
query into a `UsageLedger.query` and its answer into JSON or a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import msgspec

from gateway.config import Config
from gateway.errors import InvalidRequest
from gateway.store import open_store
from gateway.usage import UsageLedger

_encode = msgspec.json.Encoder().encode


def _day(params: Mapping[str, str], name: str) -> date | None:
    value = params.get(name)
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': expected a day as YYYY-MM-DD.", param=name) from None


async def usage_report(ledger: UsageLedger, params: Mapping[str, str]) -> bytes:
    """`{"data": [{user, alias, backend, day, requests, ...}], "totals": {...}}` as JSON.
    Days are UTC and inclusive; without `from`/`to`, the last 30 days."""
    try:
        report = await ledger.query(user=params.get("user") or None, alias=params.get("alias") or None,
                                    day_from=_day(params, "from"), day_to=_day(params, "to"))
    except ValueError as exc:
        raise InvalidRequest(f"Invalid usage range: {exc}.", param="from") from None
    return _encode(report)


_COLUMNS = ("day", "user", "alias", "backend", "requests", "prompt_tokens", "completion_tokens",
            "reported_tokens", "estimated_tokens", "cache_hits", "errors")


def usage_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table with a totals line (`llm-gateway usage`)."""
    rows = [list(_COLUMNS)]
    rows += [[str(r[c]) for c in _COLUMNS] for r in report["data"]]
    totals = report["totals"]
    rows.append(["total", "", "", "", *(str(totals[c]) for c in _COLUMNS[4:])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    numeric = range(4, len(_COLUMNS))
    return "\n".join("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in rows)


async def read_usage(config: Config, user: str | None, days: int) -> dict[str, Any]:
    """The last `days` days of usage. A redis store is read directly; a memory store lives in
    the gateway process, so its admin API is asked (server address and admin key from config)."""
    to = datetime.now(UTC).date()
    frm = to - timedelta(days=max(1, days) - 1)
    if not config.store.url.startswith("memory://"):
        store = open_store(config.store.url, max(config.store.timeout_ms, 2000))
        try:
            return await UsageLedger(store).query(user=user, day_from=frm, day_to=to)
        finally:
            await store.aclose()
    if not config.admin.key:
        raise RuntimeError("the store is memory:// (usage lives in the gateway process) and admin.key "
                           "is not set: set admin.key to read usage through GET /admin/usage")
    params = {"from": frm.isoformat(), "to": to.isoformat(), **({"user": user} if user else {})}
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"http://{host}:{config.server.port}/admin/usage", params=params,
                             headers={"authorization": f"Bearer {config.admin.key}"})
    r.raise_for_status()
    return r.json()
