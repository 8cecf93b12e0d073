"""The admin API's reports: `GET /admin/usage?user=&alias=&from=&to=` (admin key).

The route is mounted by gateway/app.py, which checks the admin key; this module turns the
query into a `UsageLedger.query` and its answer into JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

import msgspec

from gateway.errors import InvalidRequest
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
