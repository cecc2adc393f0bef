"""The transports' checks and rewrites that run on every message, and their fast paths."""

from __future__ import annotations

import random
import string

import pytest
from aiosmtplib.email import parse_address

from sendkit.delivery import transports

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
LDH = string.ascii_letters + string.digits + "-"


def _word(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))


def _dot_atom_address(rng: random.Random) -> str:
    local = ".".join(_word(rng, ATEXT) for _ in range(rng.randint(1, 3)))
    domain = ".".join(_word(rng, LDH) for _ in range(rng.randint(1, 4)))
    return f"{local}@{domain}"


def test_the_fast_path_accepts_only_what_parseaddr_returns_unchanged() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        address = _dot_atom_address(rng)
        assert transports._DOT_ATOM_ADDRESS.fullmatch(address)
        assert transports._parses_unchanged(address), address
        assert parse_address(address) == address


@pytest.mark.parametrize(
    ("address", "plain"),
    [
        ("a..b@example.com", True),
        (".a@example.com", True),
        ("a.@example.com", True),
        ("a@example..com", True),
        ("a b@example.com", False),
        ("a@example.com\r\nRCPT TO:<x@y.z>", False),
        ("a@example.com>", False),
        ('"quoted"@example.com', False),
        ("Name <a@example.com>", False),
        ("a@[127.0.0.1]", True),
        ("ünicode@example.com", True),
    ],
)
def test_other_addresses_take_the_slow_path(address: str, plain: bool) -> None:
    """(parseaddr lets odd dots and literals through unchanged; the rule is as before.)"""
    assert not transports._DOT_ATOM_ADDRESS.fullmatch(address)
    assert transports._is_plain_address(address) is plain


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\n\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"", b"\r\n"),
    ],
)
def test_line_endings_become_crlf(data: bytes, wire: bytes) -> None:
    assert transports._wire_body(data) == wire


@pytest.mark.parametrize(
    ("body", "stuffed"),
    [
        (b"no dots\r\n", b"no dots\r\n"),
        (b".leading\r\n", b"..leading\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
    ],
)
def test_dot_stuffing(body: bytes, stuffed: bytes) -> None:
    assert transports._dot_stuff(body) == stuffed
