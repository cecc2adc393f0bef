"""Mailbox parsing shared by the API, SMTP and dashboard: `addr` or `Name <addr>`."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import idna
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

_NAMED = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^"<>]*?))\s*<([^<>\s]+)>\s*$')


@dataclass(frozen=True)
class Mailbox:
    name: str
    address: str  # normalised: local part as given, domain lower-case (IDN kept as Unicode)
    ascii_domain: str

    @property
    def header(self) -> str:
        if not self.name:
            return self.address
        quoted = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{self.address}>'

    @property
    def lower(self) -> str:
        return self.address.lower()


# A request parses its sender and recipient more than once (validation, then the sender
# checks), and senders repeat across requests: the answer is a pure function of the text.
@functools.lru_cache(maxsize=4096)
def parse_mailbox(value: str) -> Mailbox:
    """Raise ValueError with a short reason when `value` is not one valid mailbox."""
    plain = _PLAIN_ADDRESS.fullmatch(value)
    if plain is None:
        return _parse_fully(value)
    local, written = plain.groups()
    known = _known_plain(local, written)
    if known is not None:
        return known
    mailbox = _parse_fully(value)
    _remember_plain(local, written, mailbox)
    return mailbox


def _parse_fully(value: str) -> Mailbox:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("must not contain CR, LF or NUL")
    name, address = _split(value)
    try:
        info = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address ({exc})") from None
    return Mailbox(name=name, address=info.normalized, ascii_domain=info.ascii_domain.lower())


# Validating an address costs ~50 us, most of it the domain's IDNA checks: a CSV import of
# a million rows, each a new address, spent more time there than anywhere else. A plain
# ASCII address whose domain was found valid before is put together without asking again.
# That holds because email_validator checks an RFC 5322 dot-atom local part (what
# `_PLAIN_ADDRESS` matches) by that pattern alone, the domain apart from the local part,
# and then the whole length; anything else (quotes, Unicode, names, the role names it
# lower-cases, a domain not seen yet) goes the whole way, and a full answer that differs
# from what the shortcut would have built is not remembered.
_PLAIN_ADDRESS = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@([A-Za-z0-9.-]+)"
)
_VALID_DOMAINS: dict[str, str] = {}  # domain as written -> as normalised; ASCII only
_MAX_VALID_DOMAINS = 4096
_MAX_ADDRESS = 254  # RFC 5321, as email_validator counts it


def _known_plain(local: str, written: str) -> Mailbox | None:
    domain = _VALID_DOMAINS.get(written)
    if (
        domain is None
        or len(local) + 1 + max(len(written), len(domain)) > _MAX_ADDRESS
        or local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES
    ):
        return None
    return Mailbox(name="", address=f"{local}@{domain}", ascii_domain=domain)


def _remember_plain(local: str, written: str, mailbox: Mailbox) -> None:
    domain = mailbox.ascii_domain
    if mailbox.address == f"{local}@{domain}" and domain.isascii():
        if len(_VALID_DOMAINS) >= _MAX_VALID_DOMAINS:
            _VALID_DOMAINS.clear()
        _VALID_DOMAINS[written] = domain


def _split(value: str) -> tuple[str, str]:
    match = _NAMED.match(value)
    if match is None:
        if "<" in value or ">" in value or "," in value:
            raise ValueError("must be one address, as 'addr' or 'Name <addr>'")
        return "", value.strip()
    quoted, bare, address = match.groups()
    name = quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted is not None else bare
    return name.strip(), address


# Pure, and domains repeat (senders, recipients' MX lookups): IDNA encoding on every
# message was ~1 % of a delivery's CPU.
@functools.lru_cache(maxsize=4096)
def normalise_domain(name: str) -> str:
    """The ASCII (punycode) lower-case form under which domains are stored and compared."""
    cleaned = name.strip().rstrip(".").lower()
    try:
        return idna.encode(cleaned, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise ValueError("is not a valid domain name") from None
