"""Sending domains and the sender addresses registered on them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from sendkit import dkim
from sendkit.accounts import new_id
from sendkit.addresses import Mailbox, normalise_domain, parse_mailbox
from sendkit.crypto import SecretBox
from sendkit.db import Database, accounts, domains, now_ms, senders
from sendkit.errors import BadRequest, InvalidDomain, NotFound, SendKitError, UnknownSender

ANY_SENDER = "*"


@dataclass(frozen=True)
class Domain:
    id: str
    name: str
    verified: bool


def _domain_name(name: str) -> str:
    try:
        return normalise_domain(name)
    except ValueError as exc:
        raise BadRequest(f"Bad request parameters: domain '{name}' {exc}") from None


async def add(
    db: Database,
    box: SecretBox,
    account_id: str,
    name: str,
    *,
    verified: bool = False,
    selector: str = "sendkit",
) -> Domain:
    """Add a domain with a new DKIM key, or return the existing one (marking it verified
    when asked)."""
    domain = Domain(new_id(), _domain_name(name), verified)
    # Key generation takes ~100 ms of CPU: keep it off the event loop.
    pem = await asyncio.to_thread(dkim.generate_private_key)
    async with db.begin() as conn:
        if await conn.scalar(sa.select(accounts.c.id).where(accounts.c.id == account_id)) is None:
            raise NotFound("Account not found")
        existing = (
            await conn.execute(
                sa.select(domains.c.id, domains.c.verified).where(
                    domains.c.account_id == account_id, domains.c.name == domain.name
                )
            )
        ).first()
        if existing is not None:
            if verified and not existing.verified:
                await conn.execute(
                    domains.update().where(domains.c.id == existing.id).values(verified=True)
                )
            return Domain(existing.id, domain.name, existing.verified or verified)
        await conn.execute(
            domains.insert().values(
                id=domain.id,
                account_id=account_id,
                name=domain.name,
                verified=verified,
                dkim_selector=selector,
                dkim_private_key=box.encrypt(pem.decode("ascii")),
                created_at=now_ms(),
            )
        )
    return domain


async def set_verified(db: Database, account_id: str, name: str, verified: bool) -> None:
    async with db.begin() as conn:
        result = await conn.execute(
            domains.update()
            .where(domains.c.account_id == account_id, domains.c.name == _domain_name(name))
            .values(verified=verified)
        )
        if result.rowcount == 0:
            raise NotFound("Domain not found")


async def add_sender(db: Database, account_id: str, address: str) -> str:
    """Register `user@domain`, or `*@domain` for every address of that domain."""
    local, _, domain_part = address.strip().rpartition("@")
    if not local or not domain_part:
        raise BadRequest("Bad request parameters: sender must be 'user@domain' or '*@domain'")
    domain_name = _domain_name(domain_part)
    stored = ANY_SENDER if local == ANY_SENDER else _sender_address(address)
    async with db.begin() as conn:
        domain_id = await conn.scalar(
            sa.select(domains.c.id).where(
                domains.c.account_id == account_id, domains.c.name == domain_name
            )
        )
        if domain_id is None:
            raise NotFound(f"Domain {domain_name} is not a domain of this account")
        try:
            async with conn.begin_nested():
                await conn.execute(
                    senders.insert().values(
                        id=new_id(),
                        account_id=account_id,
                        domain_id=domain_id,
                        address=stored,
                        created_at=now_ms(),
                    )
                )
        except IntegrityError:
            pass  # already registered: adding twice is not an error
    return stored


def _sender_address(address: str) -> str:
    try:
        return parse_mailbox(address).lower
    except ValueError as exc:
        raise BadRequest(f"Bad request parameters: sender {exc}") from None


async def check_sender(db: Database, account_id: str, sender: Mailbox) -> None:
    """Checks 7 and 8 of the documented order: verified domain, then registered sender."""
    cache_key = ("sender", account_id, sender.ascii_domain, sender.lower)
    verdict = await db.cache.get_or_load(cache_key, lambda: _sender_lookup(db, account_id, sender))
    if verdict is not True:
        raise verdict()


async def _sender_lookup(
    db: Database, account_id: str, sender: Mailbox
) -> type[SendKitError] | Literal[True]:
    query = (
        sa.select(domains.c.verified, senders.c.address)
        .select_from(domains)
        .outerjoin(
            senders,
            sa.and_(
                senders.c.domain_id == domains.c.id,
                senders.c.address.in_((sender.lower, ANY_SENDER)),
            ),
        )
        .where(domains.c.account_id == account_id, domains.c.name == sender.ascii_domain)
    )
    async with db.read() as conn:
        return _sender_verdict((await conn.execute(query)).all())


def _sender_verdict(rows: Sequence[Any]) -> type[SendKitError] | Literal[True]:
    if not rows or not rows[0].verified:
        return InvalidDomain
    if all(r.address is None for r in rows):
        return UnknownSender
    return True


async def signing_key(
    db: Database, box: SecretBox, account_id: str, domain_name: str
) -> dkim.DkimKey | None:
    """The DKIM key of an account's domain, decrypted for the signer; None without one."""
    async with db.read() as conn:
        row = (
            await conn.execute(
                sa.select(domains.c.dkim_selector, domains.c.dkim_private_key).where(
                    domains.c.account_id == account_id, domains.c.name == domain_name
                )
            )
        ).first()
    if row is None or not row.dkim_private_key or not row.dkim_selector:
        return None
    pem = box.decrypt(row.dkim_private_key).encode("ascii")
    return dkim.DkimKey(domain=domain_name, selector=row.dkim_selector, private_key_pem=pem)


async def dns_records(
    db: Database,
    box: SecretBox,
    account_id: str,
    name: str,
    *,
    mail_host: str,
    return_path_subdomain: str,
) -> list[dict[str, Any]]:
    """What to publish in DNS: SPF, the DKIM key, DMARC, and the return path."""
    domain_name = _domain_name(name)
    key = await signing_key(db, box, account_id, domain_name)
    if key is None:
        raise NotFound("Domain not found")
    spf = f"v=spf1 a:{mail_host} ~all"
    return_path = f"{return_path_subdomain}.{domain_name}"
    return [
        {"type": "TXT", "purpose": "SPF", "name": domain_name, "value": spf},
        {
            "type": "TXT",
            "purpose": "DKIM",
            "name": f"{key.selector}._domainkey.{domain_name}",
            "value": dkim.public_key_record(key.private_key_pem),
        },
        {
            "type": "TXT",
            "purpose": "DMARC",
            "name": f"_dmarc.{domain_name}",
            "value": f"v=DMARC1; p=none; rua=mailto:dmarc@{domain_name}",
        },
        {"type": "MX", "purpose": "Return-Path", "name": return_path, "value": f"10 {mail_host}"},
        {"type": "TXT", "purpose": "Return-Path SPF", "name": return_path, "value": spf},
    ]


@dataclass(frozen=True)
class DomainInfo:
    id: str
    name: str
    verified: bool
    created_at: int
    senders: tuple[str, ...]  # full addresses, "*" for any address of the domain


async def list_for_account(db: Database, account_id: str) -> list[DomainInfo]:
    """The account's domains with their senders, by name."""
    async with db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(domains.c.id, domains.c.name, domains.c.verified, domains.c.created_at)
                .where(domains.c.account_id == account_id)
                .order_by(domains.c.name)
            )
        ).all()
        sender_rows = await conn.execute(
            sa.select(senders.c.domain_id, senders.c.address)
            .where(senders.c.account_id == account_id)
            .order_by(senders.c.address)
        )
        by_domain: dict[str, list[str]] = {}
        for domain_id, address in sender_rows:
            by_domain.setdefault(domain_id, []).append(address)
    return [
        DomainInfo(r.id, r.name, r.verified, r.created_at, tuple(by_domain.get(r.id, ())))
        for r in rows
    ]


async def get(db: Database, account_id: str, name: str) -> DomainInfo:
    """One domain of the account; another account's domain answers like a missing one."""
    wanted = _domain_name(name)
    for info in await list_for_account(db, account_id):
        if info.name == wanted:
            return info
    raise NotFound("Domain not found")


async def remove_sender(db: Database, account_id: str, domain_name: str, address: str) -> None:
    """Unregister a sender (`*` for the any-address entry) of one of the account's domains."""
    info = await get(db, account_id, domain_name)
    stored = ANY_SENDER if address.strip() in (ANY_SENDER, f"*@{info.name}") else address
    async with db.begin() as conn:
        result = await conn.execute(
            senders.delete().where(
                senders.c.account_id == account_id,
                senders.c.domain_id == info.id,
                senders.c.address == stored.strip().lower(),
            )
        )
        if result.rowcount == 0:
            raise NotFound("Sender not found")
