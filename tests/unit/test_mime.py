"""Tests for sendkit.mime.

Round-trip convention: decoded text parts are compared after normalising
line breaks to "\\n" on both sides, because build() canonicalises every line
break (CRLF, bare LF, bare CR) to CRLF as RFC 2046 requires for text/*.
"""

from __future__ import annotations

import base64
import email
import random
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import format_datetime

import pytest

from sendkit import mime
from sendkit.mime import OutgoingMessage, ascii_domain, build, html_to_text, is_html, sending_domain

CREATED = datetime(2024, 3, 5, 14, 30, 7, tzinfo=UTC)


def make(**overrides: object) -> OutgoingMessage:
    base = OutgoingMessage(
        message_id="0123456789abcdef0123456789abcdef",
        from_header="Acme <news@acme.example>",
        to_header="Jo Doe <jo@example.com>",
        subject="Hello",
        body="Hi Jo,\nthanks.\n",
        created_at=CREATED,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def raw_header(raw: bytes, name: str) -> str:
    """The unfolded raw value of header ``name`` (still RFC 2047 encoded)."""
    match = re.search(rf"^{name}: (.*?)\r\n(?! )", raw.decode("ascii"), re.M | re.S)
    assert match is not None, name
    return match[1].replace("\r\n", "")


def assert_wire_safe(raw: bytes) -> None:
    assert raw.isascii()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None, "bare CR or LF"
    assert raw.endswith(b"\r\n")
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"." not in lines, 'a line that is exactly "."'
    assert b"\0" not in raw
    for line in header_lines(raw):
        assert line.strip(b" \t"), "whitespace-only header line"


def text_content(msg: EmailMessage) -> str:
    content = msg.get_content()
    assert isinstance(content, str)
    return normalise(content)


# --------------------------------------------------------------------------
# sending_domain / ascii_domain


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        ("news@acme.example", "acme.example"),
        ("Acme <News@ACME.Example>", "acme.example"),
        ('"Acme, Inc." <a@Mail.Acme.Example>', "mail.acme.example"),
        ("Bücher <info@Bücher.DE>", "bücher.de"),
        ("info@xn--bcher-kva.de", "xn--bcher-kva.de"),
    ],
)
def test_sending_domain(from_header: str, expected: str) -> None:
    assert sending_domain(from_header) == expected


@pytest.mark.parametrize("from_header", ["a@x.com, b@y.com", "nobody", "", "a@"])
def test_sending_domain_rejects_bad_from(from_header: str) -> None:
    with pytest.raises(ValueError):
        sending_domain(from_header)


def test_ascii_domain() -> None:
    assert ascii_domain("bücher.de") == "xn--bcher-kva.de"
    assert ascii_domain("Bücher.DE") == "xn--bcher-kva.de"
    assert ascii_domain("例え.jp") == "xn--r8jz45g.jp"
    assert ascii_domain("Example.COM") == "Example.COM"
    with pytest.raises(ValueError):
        ascii_domain("bad..dömain")


# --------------------------------------------------------------------------
# is_html


@pytest.mark.parametrize(
    "body",
    [
        "<p>Hello</p>",
        "Hello<br>world",
        "Hello<br/>world",
        "Line<BR />two",
        "<div class='x'>a</div>",
        "<html><body>x</body></html>",
        "<!DOCTYPE html><title>x</title>",
        'Click <a href="https://x.example">here</a>',
        "<a href=https://x.example>here",
        "<table><tr><td>1</td></tr></table>",
        "Some <b>bold</b> text",
        "<h1>Title</h1>",
        "<ul><li>one</li></ul>",
        "<img src='x.png' alt='logo'>",
        'text <span style="color:red">red</span>',
        "the <code>x</code> variable",
        "\n\n   <P>\n",
    ],
)
def test_is_html_true(body: str) -> None:
    assert is_html(body)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "plain text",
        "a < b and c > d",
        "x<y and y>z",
        "Contact <john@example.com> today",
        "John Doe <john@example.com>",
        "Usage: cmd <file> [<options>]",
        "Send it to <address> please",
        "Fill in your <code> here",
        "choose <a> or <c>",
        "x << 2 >> 1",
        "<3 you",
        "<- back | next ->",
        "< p >not a tag</ p >",
        "<b.smith@example.com>",
        "<p@example.com>",
        "5 <= 6 >= 4",
        "<https://example.com/path>",
        "<!-- just a comment -->",
    ],
)
def test_is_html_false(body: str) -> None:
    assert not is_html(body)


def test_is_html_is_linear_on_hostile_input() -> None:
    hostile = "<a " + "=" * 200_000
    started = time.perf_counter()
    assert not is_html(hostile)
    assert not is_html("<p " * 100_000)
    assert time.perf_counter() - started < 2


# --------------------------------------------------------------------------
# Headers


def test_plain_message_headers_and_round_trip() -> None:
    raw = build(make())
    assert_wire_safe(raw)
    names = [line.split(b":", 1)[0] for line in header_lines(raw) if not line.startswith(b" ")]
    assert names == [
        b"From",
        b"To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"MIME-Version",
        b"Content-Type",
        b"Content-Transfer-Encoding",
    ]
    assert b"\r\nDate: Tue, 05 Mar 2024 14:30:07 +0000\r\n" in raw
    assert b"\r\nMessage-ID: <0123456789abcdef0123456789abcdef@acme.example>\r\n" in raw
    assert b"\r\nMIME-Version: 1.0\r\n" in raw
    msg = parse(raw)
    assert msg["Subject"] == "Hello"
    assert msg["From"].addresses[0].display_name == "Acme"
    assert msg["From"].addresses[0].addr_spec == "news@acme.example"
    assert msg["To"].addresses[0].display_name == "Jo Doe"
    assert msg["To"].addresses[0].addr_spec == "jo@example.com"
    assert msg["Date"].datetime == CREATED
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_content(msg) == "Hi Jo,\nthanks.\n"


def test_build_is_deterministic() -> None:
    message = make(body="<p>Hi</p>")
    assert build(message) == build(message)


def test_date_keeps_offset_and_rejects_naive() -> None:
    plus_two = CREATED.astimezone(timezone(timedelta(hours=2)))
    assert b"\r\nDate: Tue, 05 Mar 2024 16:30:07 +0200\r\n" in build(make(created_at=plus_two))
    with pytest.raises(ValueError, match="timezone-aware"):
        build(make(created_at=CREATED.replace(tzinfo=None)))


@pytest.mark.parametrize("message_id", ["", "a b", "<x>", "a@b", "a..b", "x" * 201, "é"])
def test_bad_message_id(message_id: str) -> None:
    with pytest.raises(ValueError, match="message_id"):
        build(make(message_id=message_id))


@pytest.mark.parametrize(
    "subject",
    [
        "Hello",
        "",
        "Your receipt for order #1234",
        "Ünïcödé sübject – “quoted” — 😀",
        "Привет, мир! Это длинная тема письма, которая должна быть разбита на несколько слов",
        "件名はとても長いです。" * 8,
        "x" * 120,
        "a long ascii subject " * 10,
        "  leading and trailing spaces  ",
        "double  spaces\tand tab",
        "looks =?utf-8?q?encoded?= but is not",
        'semi; colon, comma: "quotes" (parens) <angles> @ \\ back',
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉",
        "control \x01 char and \x7f del",
        "line\u2028separator",
    ],
)
def test_subject_round_trip(subject: str) -> None:
    raw = build(make(subject=subject))
    assert_wire_safe(raw)
    assert all(len(line) <= 78 for line in header_lines(raw) if b"xxxxxxxxxx" not in line)
    assert parse(raw)["Subject"] == subject


def test_non_ascii_subject_is_rfc2047_encoded() -> None:
    raw = build(make(subject="Grüße"))
    assert b"\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?=\r\n" in raw


def test_long_unbreakable_ascii_subject_stays_raw_under_998() -> None:
    subject = "x" * 900
    raw = build(make(subject=subject))
    assert f"\r\nSubject: {subject}\r\n".encode() in raw
    assert parse(build(make(subject="y" * 2000)))["Subject"] == "y" * 2000


@pytest.mark.parametrize(
    ("to_header", "expected"),
    [
        ("jo@example.com", [("", "jo@example.com")]),
        ("<jo@example.com>", [("", "jo@example.com")]),
        ("Jo Doe <jo@example.com>", [("Jo Doe", "jo@example.com")]),
        ('"Doe, Jo" <jo@example.com>', [("Doe, Jo", "jo@example.com")]),
        ("John Q. Public <jqp@example.com>", [("John Q. Public", "jqp@example.com")]),
        ('"A \\"quoted\\" name" <q@example.com>', [('A "quoted" name', "q@example.com")]),
        ("José Pérez <jose@example.com>", [("José Pérez", "jose@example.com")]),
        ("山田 太郎 <taro@example.jp>", [("山田 太郎", "taro@example.jp")]),
        ('"Ünï, Cödé" <u@example.com>', [("Ünï, Cödé", "u@example.com")]),
        ("=?utf-8?q?Encoded_Name?= <e@example.com>", [("Encoded Name", "e@example.com")]),
        # Python renders addr_spec unquoted; the wire form is checked below.
        ('"john..doe"@example.com', [("", "john..doe@example.com")]),
        ("a@x.example, B <b@y.example>", [("", "a@x.example"), ("B", "b@y.example")]),
        ("Anna <anna@bücher.de>", [("Anna", "anna@xn--bcher-kva.de")]),
        ("anna@例え.jp", [("", "anna@xn--r8jz45g.jp")]),
    ],
)
def test_to_round_trip(to_header: str, expected: list[tuple[str, str]]) -> None:
    raw = build(make(to_header=to_header))
    if "john..doe" in to_header:
        assert b'\r\nTo: "john..doe"@example.com\r\n' in raw
    assert_wire_safe(raw)
    assert all(len(line) <= 78 for line in header_lines(raw))
    addresses = parse(raw)["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in addresses] == expected


def test_non_ascii_display_name_is_rfc2047_encoded() -> None:
    raw = build(make(from_header="Jöhn Dœ <john@example.com>"))
    assert raw.startswith(b"From: =?utf-8?b?SsO2aG4gRMWT?= <john@example.com>\r\n")


def test_idn_from_domain_is_punycoded_everywhere() -> None:
    raw = build(make(from_header="Bücher <Info@Bücher.de>"))
    assert raw.startswith(b"From: =?utf-8?b?QsO8Y2hlcg==?= <Info@xn--bcher-kva.de>\r\n")
    assert b"@xn--bcher-kva.de>\r\nMIME-Version" in raw
    msg = parse(raw)
    assert msg["From"].addresses[0].domain == "xn--bcher-kva.de"
    assert msg["From"].addresses[0].display_name == "Bücher"


def test_long_display_names_fold_and_decode() -> None:
    name = "Département des Ressources Humaines et de la Communication Interne"
    ascii_name = "The Extremely Long Department Name Of The Example Corporation Limited"
    raw = build(make(to_header=f"{name} <hr@example.fr>, {ascii_name} <d@example.com>"))
    assert_wire_safe(raw)
    assert all(len(line) <= 78 for line in header_lines(raw))
    # Python < 3.14 inserts a space between adjacent encoded-words in a
    # display name (CPython gh-128110); an RFC 2047 decoder does not.
    decoded = str(make_header(decode_header(raw_header(raw, "To"))))
    assert decoded == f"{name} <hr@example.fr>, {ascii_name} <d@example.com>"
    addresses = parse(raw)["To"].addresses
    assert addresses[1].display_name == ascii_name
    assert [a.addr_spec for a in addresses] == ["hr@example.fr", "d@example.com"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("to_header", "jö@example.com", "SMTPUTF8"),
        ("to_header", "not an address", "invalid address"),
        ("to_header", '"=?utf-8?q?x?=" <l@example.com>', "encoded word inside quoted"),
        ("to_header", "a@", "invalid address"),
        ("to_header", "", "no address"),
        ("to_header", "undisclosed-recipients:;", "groups"),
        ("to_header", "Doe, John <j@example.com>", "invalid address"),
        ("to_header", "a@example.com\r\nBcc: evil@example.com", "CR or LF"),
        ("to_header", "Evil\n <a@example.com>", "CR or LF"),
        ("from_header", "a@x.example, b@y.example", "exactly one"),
        ("from_header", "a@example.com\rX: y", "CR or LF"),
        ("subject", "Hi\r\nBcc: evil@example.com", "CR or LF"),
        ("subject", "Hi\nthere", "CR or LF"),
        ("subject", "Hi\rthere", "CR or LF"),
    ],
)
def test_rejects_unsafe_headers(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(make(**{field: value}))


# --------------------------------------------------------------------------
# Extra headers


def test_extra_headers_added_verbatim_after_mime_version() -> None:
    unsub = "<https://acme.example/unsubscribe?token=" + "t" * 120 + ">, <mailto:u@acme.example>"
    raw = build(
        make(
            extra_headers=(
                ("List-Unsubscribe", unsub),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
                ("X-Campaign", "spring\tsale"),
            )
        )
    )
    assert_wire_safe(raw)
    assert f"\r\nList-Unsubscribe: {unsub}\r\n".encode() in raw
    assert b"MIME-Version: 1.0\r\nList-Unsubscribe: " in raw
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw
    assert b"\r\nX-Campaign: spring\tsale\r\n" in raw
    assert parse(raw)["List-Unsubscribe"] == unsub


def test_extra_address_and_non_ascii_headers_are_encoded() -> None:
    raw = build(
        make(
            extra_headers=(
                ("Reply-To", "Sérvice <help@bücher.de>"),
                ("X-Label", "Été 2024"),
            )
        )
    )
    assert_wire_safe(raw)
    msg = parse(raw)
    reply_to = msg["Reply-To"].addresses[0]
    assert (reply_to.display_name, reply_to.addr_spec) == ("Sérvice", "help@xn--bcher-kva.de")
    assert msg["X-Label"] == "Été 2024"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((("X-Evil", "a\r\nBcc: victim@example.com"),), "CR or LF"),
        ((("X-Evil", "a\nb"),), "CR or LF"),
        ((("X-Evil", "a\rb"),), "CR or LF"),
        ((("X-Evil", "é\nb"),), "CR or LF"),
        ((("X-Evil", "nul\x00byte"),), "control"),
        ((("X-Evil", "vertical\x0btab"),), "control"),
        ((("X-Evil: x", "y"),), "header name"),
        ((("X Evil", "y"),), "header name"),
        ((("X-Évil", "y"),), "header name"),
        ((("", "y"),), "header name"),
        ((("Subject", "second subject"),), "cannot be set"),
        ((("from", "x@example.com"),), "cannot be set"),
        ((("Content-Type", "text/html"),), "cannot be set"),
        ((("MIME-Version", "2.0"),), "cannot be set"),
        ((("Bcc", "hidden@example.com"),), "cannot be set"),
        ((("Reply-To", "a@example.com"), ("reply-to", "b@example.com")), "only once"),
        ((("X-Long", "v" * 991),), "998"),
        ((("Reply-To", "a@example.com\nX: y"),), "CR or LF"),
    ],
)
def test_extra_header_validation(extra: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(make(extra_headers=extra))


# --------------------------------------------------------------------------
# Bodies


HAZARDOUS_BODIES = {
    "long_line": "a" * 5000 + "\nshort\n" + "b " * 3000,
    "long_line_no_spaces_non_ascii": "é" * 5000,
    "nul": "before\x00after\n\x00\n",
    "bare_cr": "one\rtwo\rthree",
    "bare_lf": "one\ntwo\nthree\n",
    "crlf": "one\r\ntwo\r\n",
    "mixed": "a\r\nb\nc\rd\r\r\ne",
    "dot_lf": "before\n.\nafter",
    "dot_cr": "before\r.\r\nafter",
    "dot_crlf": "before\r\n.\r\nafter\r\n",
    "just_dot": ".",
    "dot_last_line": "end\n.",
    "dot_first_line": ".\nstart",
    "dot_after_soft_break": "x" * 75 + ".\n" + "y" * 76 + ".",
    "dots": "..\n...\n. \n.",
    "from_line": "Hello\nFrom here on\nbye",
    "trailing_spaces": "space at end   \ntab at end\t\n   ",
    "equals_and_controls": "a=b =?x?= \x01\x02\x1b[0m\x7f\x0c\x0b",
    "unicode_separators": "a\u2028b\u2029c\x85d\x1ce",
    "cyrillic": "Привет, мир!\n" * 50,
    "emoji": "😀🎉" * 100,
    "empty": "",
    "only_newlines": "\n\n\n",
    "boundary_lookalike": "--=_sk0123\n--=_sk0123--\n",
}


@pytest.mark.parametrize("name", sorted(HAZARDOUS_BODIES))
def test_plain_body_is_wire_safe_and_round_trips(name: str) -> None:
    body = HAZARDOUS_BODIES[name]
    assert not is_html(body)
    raw = build(make(body=body))
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert text_content(msg) == normalise(body)


@pytest.mark.parametrize("name", sorted(HAZARDOUS_BODIES))
def test_html_body_is_wire_safe_and_round_trips(name: str) -> None:
    body = "<p>Hi</p>\n" + HAZARDOUS_BODIES[name]
    raw = build(make(body=body))
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    html_part = msg.get_body(preferencelist=("html",))
    assert html_part is not None
    assert isinstance(html_part, EmailMessage)
    assert text_content(html_part) == normalise(body)


def test_cte_choice() -> None:
    ascii_raw = build(make(body="Hello world\n"))
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHello world\r\n" in ascii_raw
    assert b"Content-Transfer-Encoding: base64" in build(make(body="Привет, мир!\n" * 20))
    # A "From " line would be munged to ">From " by mbox-style relays.
    assert b"Content-Transfer-Encoding: base64" in build(make(body="Hi\nFrom me\n"))


def test_dot_line_is_escaped_in_quoted_printable() -> None:
    raw = build(make(body="a\n.\nb\n"))
    assert b"\r\n\r\na\r\n=2E\r\nb\r\n" in raw


def test_missing_final_newline_is_preserved_with_soft_break() -> None:
    raw = build(make(body="no newline"))
    assert raw.endswith(b"\r\n\r\nno newline=\r\n")
    assert parse(raw).get_content() == "no newline"


def test_base64_body_uses_crlf_canonical_form() -> None:
    raw = build(make(body="Привет\nмир\n" * 30))
    content = parse(raw).get_content()
    assert content == "Привет\r\nмир\r\n" * 30


def test_surrogates_in_body_raise_value_error() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        build(make(body="broken \ud800 surrogate"))


# --------------------------------------------------------------------------
# HTML


EMAIL_HTML = """<!DOCTYPE html><html><head><style>p {color: red}</style></head><body>
<table width="100%"><tr><td><img src="https://acme.example/logo.png" alt="ACME"></td></tr>
<tr><td><h1>Welcome, Jo!</h1><p>Thanks for <b>signing up</b> &amp; welcome&nbsp;aboard.
Caf&eacute; &rarr; na&iuml;ve</p>
<p><a href="https://acme.example/confirm?t=abc&amp;u=1">Confirm your address</a></p></td></tr>
<tr><td>Price</td><td>12 &euro;</td></tr>
<tr><td><ul><li>first</li><li>second</li></ul></td></tr>
</table><img src="https://t.acme.example/pixel.gif" width="1" height="1" alt=""></body></html>"""


def test_html_message_is_multipart_alternative() -> None:
    raw = build(make(body=EMAIL_HTML, subject="Wélcome"))
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert all(p["Content-Transfer-Encoding"] == "quoted-printable" for p in parts)
    assert all("MIME-Version" not in p for p in parts)
    assert msg["Subject"] == "Wélcome"
    html_part = msg.get_body(preferencelist=("html",))
    text_part = msg.get_body(preferencelist=("plain",))
    assert isinstance(html_part, EmailMessage)
    assert isinstance(text_part, EmailMessage)
    assert text_content(html_part) == EMAIL_HTML
    assert text_content(text_part) == html_to_text(EMAIL_HTML)


def test_html_to_text() -> None:
    text = html_to_text(EMAIL_HTML)
    assert "<" not in text.replace("<https", "")
    assert "# Welcome, Jo!" in text
    assert "Thanks for signing up & welcome\u00a0aboard." in text
    assert "Café → naïve" in text
    assert "[Confirm your address](https://acme.example/confirm?t=abc&u=1)" in text
    assert "Price 12 €" in text
    assert "ACME" in text
    assert "pixel" not in text
    assert "color: red" not in text
    assert "first" in text
    assert "second" in text
    assert "**" not in text
    assert "\n\n\n" not in text
    assert not re.search(r"[ \t]$", text, re.M)
    assert text.endswith("\n")
    assert not text.endswith("\n\n")


def test_html_to_text_does_not_wrap_long_lines() -> None:
    sentence = "word " * 60
    assert html_to_text(f"<p>{sentence}</p>") == sentence.strip() + "\n"


# --------------------------------------------------------------------------
# DKIM: the bytes are what gets signed, so a signature must verify as is.


def test_dkim_signature_verifies() -> None:
    dkim = pytest.importorskip("dkim")
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dns_record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)
    raw = build(
        make(
            from_header="Bücher <news@bücher.de>",
            subject="Grüße 😀",
            body=EMAIL_HTML + "\n.\n",
        )
    )
    domain = ascii_domain(sending_domain("news@bücher.de"))
    signature = dkim.sign(
        raw,
        b"s1",
        domain.encode(),
        private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    signed = signature + raw

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey." + domain.encode() + b"."
        return dns_record

    assert dkim.verify(signed, dnsfunc=dns)


# --------------------------------------------------------------------------
# Randomised checks (seeded, so failures reproduce)


def test_fuzz_bodies_and_subjects() -> None:
    rng = random.Random(20240305)
    pieces = [
        "a", "Z", " ", "  ", "\t", ".", "\n", "\r", "\r\n", "\n.\n", "\r.\r\n", "\x00",
        "=", "=?", "é", "Ж", "漢", "😀", "\u2028", "From ", "<p>", "x" * 80, "--",
    ]  # fmt: skip
    for _ in range(400):
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        subject = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 15)))
        subject = subject.replace("\r", "").replace("\n", "")
        raw = build(make(body=body, subject=subject))
        assert_wire_safe(raw)
        msg = parse(raw)
        assert msg["Subject"] == subject
        part = msg.get_body(preferencelist=("html", "plain"))
        assert isinstance(part, EmailMessage)
        assert text_content(part) == normalise(body)


def test_fuzz_display_names() -> None:
    rng = random.Random(77)
    pieces = ["a", "B", " ", ".", ",", '"', "\\", "(", ")", "<", ">", "@", ":", ";", "é", "漢"]
    for _ in range(300):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raw = build(make(to_header=f"{quoted} <to@example.com>"))
        assert_wire_safe(raw)
        (address,) = parse(raw)["To"].addresses
        assert address.addr_spec == "to@example.com"
        assert " ".join(address.display_name.split()) == " ".join(name.split())


def test_simple_address_fast_path_matches_full_parser() -> None:
    rng = random.Random(5)
    specials = ["a", "Z", "0", " ", "  ", "\t", ".", "-", "_", "=", "?", "'", "!", "+", "<", "@"]
    non_ascii = ["é", "Ж", "漢", "😀", "\u00a0", "\u2028", "\u3000", "\u200b", "\ufeff", "\x85"]
    hits = 0
    for _ in range(20_000):
        alphabet = specials + rng.sample(non_ascii, 3)
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        local = "".join(rng.choice(["a", "0", ".", "-", "+"]) for _ in range(rng.randint(1, 4)))
        domain = "".join(rng.choice(["b", "1", ".", "-", *alphabet[-3:]]) for _ in range(5))
        value = rng.choice(
            [f"{name} <{local}@{domain}>", f"{local}@{domain}", f" {name}<{local}@{domain}>"]
        )
        match = mime._SIMPLE_MAILBOX.fullmatch(value)
        if match is None or "=?" in value:
            continue
        hits += 1
        assert (mime._simple_mailbox(match),) == mime._parse_mailboxes_fully(value), value
    assert hits > 1000


def _with_the_generator(msg: OutgoingMessage) -> bytes:
    """build() as it was for text/plain: through email.generator."""
    message = EmailMessage(policy=mime._POLICY)
    for name, value in mime._headers(msg):
        message.set_raw(name, value)
    mime._set_text(message, msg.body, "plain")
    return message.as_bytes()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"body": ""},
        {"body": "no final newline"},
        {"body": "From the top\n.\n..\nend\r\nCR\rLF\n"},
        {"body": "é" * 300},  # base64 is shorter
        {"body": "x" * 5000 + "\n" + "tab\tend \n"},
        {"body": "\x00\x01 controls \x7f\n"},
        {"subject": "Ünïcødé " * 20, "to_header": "Zoë Ünïcødé <zoe@example.com>"},
        {"subject": "long " * 60},
        {
            "extra_headers": (
                ("List-Unsubscribe", "<https://example.com/u/" + "a" * 120 + ">"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
                ("Reply-To", "Support <support@acme.example>"),
                ("X-Note", "Grüße"),
            )
        },
    ],
)
def test_text_messages_are_written_exactly_as_the_generator_writes_them(
    overrides: dict[str, object],
) -> None:
    msg = make(**overrides)
    assert build(msg) == _with_the_generator(msg)


def test_random_text_messages_match_the_generator_too() -> None:
    rng = random.Random(11)
    alphabet = "ab .\n\r\t=é€\x00>From-" + "x" * 20
    for _ in range(300):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        subject = "".join(rng.choice("Sub ject é") for _ in range(rng.randint(0, 120)))
        msg = make(body=body, subject=subject)
        assert build(msg) == _with_the_generator(msg), (body, subject)


def test_the_date_header_is_format_datetimes() -> None:
    """The same text as email.utils.format_datetime, for any time and offset (whole
    minutes formatted here, others by format_datetime itself)."""
    rng = random.Random(5)
    offsets = [0, 0, 60, -60, 330, -570, 840, -720]
    for _ in range(5000):
        zone = timezone(timedelta(minutes=rng.choice(offsets)))
        when = datetime.fromtimestamp(rng.uniform(-2e9, 4e9), zone)
        assert mime._date_header(when) == format_datetime(when)
    odd = datetime(2026, 1, 1, tzinfo=timezone(timedelta(seconds=30)))
    assert mime._date_header(odd) == format_datetime(odd)
    with pytest.raises(ValueError, match="timezone-aware"):
        mime._date_header(datetime(2026, 1, 1))


def test_fragile_lines_are_what_a_multiline_search_finds() -> None:
    """A lone "." line or a "From " line anywhere (first, middle, last), as
    `^(?:\\.$|From )` in multi-line mode finds them, over many small texts."""
    reference = re.compile(rb"^(?:\.$|From )", re.MULTILINE)
    rng = random.Random(9)
    pieces = [b".", b"\n", b"From ", b"F", b"x", b" ", b"rom", b".."]
    for _ in range(20000):
        text = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert mime._fragile_line(text) is bool(reference.search(text)), text


def test_a_repeated_body_is_encoded_once_and_alike() -> None:
    """One body sent to many (a campaign) is encoded once; the answer is the encoding's
    own, and bodies past the size kept are encoded every time."""
    mime._encode_body_cached.cache_clear()
    body = "Hello,\n" + "x" * 1024 + "\n.\nFrom here\n"
    first = mime._encode_body(body)
    again = mime._encode_body("".join(["Hello,\n", "x" * 1024, "\n.\nFrom here\n"]))
    assert first == again == mime._encode_body_once(body)
    assert mime._encode_body_cached.cache_info().hits == 1
    large = "y" * (mime._CACHED_BODY_CHARS + 1)
    assert mime._encode_body(large) == mime._encode_body_once(large)
    assert mime._encode_body_cached.cache_info().currsize == 1
