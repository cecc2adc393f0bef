"""Looking up the DNS records a domain should publish (`domains.dns_records`) and saying,
record by record, whether they are there.

SPF and DKIM are required: when both are found the domain becomes verified. DMARC and the
return path are recommended (bounces and alignment), shown but not required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from sendkit import domains
from sendkit.crypto import SecretBox
from sendkit.db import Database

REQUIRED = frozenset({"SPF", "DKIM"})
_LIFETIME = 5.0


class TxtMxResolver(Protocol):
    async def lookup(self, name: str, rdtype: str) -> list[str]:
        """The record texts (TXT strings joined, MX as 'preference host'); [] for none."""
        ...


class DnsResolver:
    """dnspython's async resolver, optionally pointed at one server ('host' or 'host:port')."""

    def __init__(self, nameserver: str | None = None, lifetime: float = _LIFETIME) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver is not None:
            host, _, port = (
                nameserver.rpartition(":") if ":" in nameserver else (nameserver, "", "")
            )
            self._resolver.nameservers = [host]
            self._resolver.port = int(port) if port else 53
        self._lifetime = lifetime

    async def lookup(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(name, rdtype, lifetime=self._lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [_text(rdata, rdtype) for rdata in answer]


def _text(rdata: Any, rdtype: str) -> str:
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return f"{rdata.preference} {str(rdata.exchange).rstrip('.')}"


@dataclass(frozen=True)
class RecordCheck:
    record: dict[str, Any]
    required: bool
    ok: bool
    found: list[str]
    error: str | None = None


@dataclass(frozen=True)
class Verification:
    domain: str
    checks: list[RecordCheck]

    @property
    def verified(self) -> bool:
        return all(c.ok for c in self.checks if c.required)


def _normalise(value: str) -> str:
    return " ".join(value.replace('"', "").split()).lower().rstrip(".")


def _matches(record: dict[str, Any], found: list[str]) -> bool:
    expected = _normalise(record["value"])
    if record["purpose"] in ("SPF", "Return-Path SPF"):
        # Only one SPF record may exist, and ours must be that record.
        spf = [_normalise(v) for v in found if _normalise(v).startswith("v=spf1")]
        return spf == [expected]
    if record["purpose"] == "DMARC":
        return any(_normalise(v).startswith("v=dmarc1") for v in found)
    return expected in {_normalise(v) for v in found}


async def check_record(resolver: TxtMxResolver, record: dict[str, Any]) -> RecordCheck:
    required = record["purpose"] in REQUIRED
    try:
        found = await resolver.lookup(record["name"], record["type"])
    except dns.exception.DNSException as exc:
        reason = "timed out" if isinstance(exc, dns.exception.Timeout) else type(exc).__name__
        return RecordCheck(record, required, False, [], f"lookup failed: {reason}")
    return RecordCheck(record, required, _matches(record, found), found)


async def verify(
    db: Database,
    box: SecretBox,
    account_id: str,
    name: str,
    *,
    mail_host: str,
    return_path_subdomain: str,
    resolver: TxtMxResolver,
) -> Verification:
    """Look every record up; mark the domain verified when the required ones are there.
    A failed check never un-verifies a domain (a DNS outage must not stop its mail)."""
    records = await domains.dns_records(
        db,
        box,
        account_id,
        name,
        mail_host=mail_host,
        return_path_subdomain=return_path_subdomain,
    )
    checks = [await check_record(resolver, record) for record in records]
    result = Verification(records[0]["name"], checks)
    if result.verified:
        await domains.set_verified(db, account_id, result.domain, True)
    return result
