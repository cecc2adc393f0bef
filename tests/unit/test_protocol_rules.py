"""`web.protocol`'s small rules: when a body goes out as it is, and `Connection` tokens."""

from __future__ import annotations

import pytest

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
