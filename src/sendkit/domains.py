"""Sending domains and the sender addresses registered on them."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from sendkit.accounts import new_id
from sendkit.addresses import Mailbox, normalise_domain, parse_mailbox
from sendkit.db import Database, accounts, domains, now_ms, senders
from sendkit.errors import BadRequest, InvalidDomain, NotFound, UnknownSender

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


async def add(db: Database, account_id: str, name: str, *, verified: bool = False) -> Domain:
    """Add a domain, or return the existing one (marking it verified when asked)."""
    domain = Domain(new_id(), _domain_name(name), verified)
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
        rows = (await conn.execute(query)).all()
    if not rows or not rows[0].verified:
        raise InvalidDomain()
    if all(r.address is None for r in rows):
        raise UnknownSender()
