"""`web.protocol`'s small rules: when a body goes out as it is, and `Connection` tokens."""

from __future__ import annotations

import pytest
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

from sendkit.web import protocol


@pytest.mark.parametrize(
    ("method", "status", "plain"),
    [
        ("POST", 200, True),
        ("DELETE", 400, True),
        ("GET", 500, True),
        ("HEAD", 200, False),  # no body for HEAD
        ("POST", 204, False),
        ("POST", 304, False),
        ("POST", 101, False),
    ],
)
def test_only_a_body_sent_as_is_takes_the_direct_write(
    method: str, status: int, plain: bool
) -> None:
    assert protocol._plain(method, status) is plain


def test_connection_close_is_a_token_not_a_substring() -> None:
    assert b"close" in protocol._tokens(b"keep-alive, Close")
    assert b"close" not in protocol._tokens(b"closed-captions")


_GOOD = ((b"date", b"Fri, 27 Nov 2026 10:00:00 GMT"), (b"content-type", b"application/json"))


@pytest.mark.parametrize(
    "bad",
    [
        (b"x-id", b"a\r\nSet-Cookie: x=y"),
        (b"x-id", b"a\nb"),
        (b"x-id", b"a\x00b"),
        (b"x-id", b"a\x7fb"),
        (b"x id", b"a"),
        (b"x:id", b"a"),
        (b"x\r\nid", b"a"),
        (b"x(id)", b"a"),
    ],
)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_bad_header_anywhere_is_refused(bad: tuple[bytes, bytes], where: str) -> None:
    """Every name and value is searched, whatever its place among the others."""
    headers = {
        "first": (bad, *_GOOD),
        "middle": (_GOOD[0], bad, _GOOD[1]),
        "last": (*_GOOD, bad),
    }[where]
    with pytest.raises(RuntimeError, match="Invalid HTTP header"):
        protocol._check(headers)


def test_good_headers_and_a_tab_in_a_value_pass() -> None:
    protocol._check((*_GOOD, (b"x-note", b"a\tb"), (b"x-empty", b"")))


@pytest.mark.parametrize("part", ["name", "value"])
def test_every_byte_is_judged_as_uvicorns_pattern_judges_it(part: str) -> None:
    pattern = HEADER_RE if part == "name" else HEADER_VALUE_RE
    for byte in range(256):
        one = bytes((byte,))
        header = (b"x-" + one, b"v") if part == "name" else (b"x-note", b"v" + one)
        refused = pattern.search(header[0] if part == "name" else header[1]) is not None
        if refused:
            with pytest.raises(RuntimeError):
                protocol._check((*_GOOD, header))
        else:
            protocol._check((*_GOOD, header))
