"""Mailbox parsing shared by the API, SMTP and dashboard: `addr` or `Name <addr>`."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import idna
from email_validator import EmailNotValidError, validate_email

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
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("must not contain CR, LF or NUL")
    name, address = _split(value)
    try:
        info = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address ({exc})") from None
    return Mailbox(name=name, address=info.normalized, ascii_domain=info.ascii_domain.lower())


def _split(value: str) -> tuple[str, str]:
    match = _NAMED.match(value)
    if match is None:
        if "<" in value or ">" in value or "," in value:
            raise ValueError("must be one address, as 'addr' or 'Name <addr>'")
        return "", value.strip()
    quoted, bare, address = match.groups()
    name = quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted is not None else bare
    return name.strip(), address


def normalise_domain(name: str) -> str:
    """The ASCII (punycode) lower-case form under which domains are stored and compared."""
    cleaned = name.strip().rstrip(".").lower()
    try:
        return idna.encode(cleaned, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise ValueError("is not a valid domain name") from None
