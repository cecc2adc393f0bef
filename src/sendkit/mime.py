"""Build the RFC 5322 / MIME message for one outgoing email.

Everything here is pure: :func:`build` turns an :class:`OutgoingMessage` into
the exact bytes that the worker DKIM-signs and hands to SMTP.

Design notes (the *why*):

* Header values are encoded and folded here rather than by
  ``email.policy``: the folder of the Python 3.11 standard library produces
  whitespace-only continuation lines, over-long lines and corrupted display
  names for some inputs, and encodes IDN domains as RFC 2047 words, which is
  invalid inside an address.  The pre-folded values are stored with
  ``set_raw`` under a policy with ``refold_source="none"``, so the email
  package emits them untouched.
* Non-ASCII header text becomes UTF-8 "B" encoded-words of at most 75
  characters, split on character boundaries (RFC 2047 §5).  A display name
  that needs more than one encoded-word is decoded correctly by RFC 2047
  readers; the Python 3.11 ``policy.default`` parser adds a space at each
  split (CPython gh-128110), so display names are kept to one word when they
  fit (45 UTF-8 bytes).
* Bodies are always quoted-printable or base64, never 7bit/8bit, so that no
  user input can produce bare CR/LF, NUL, lines over 998 octets or a line that
  is exactly ``"."``.  Line breaks (CRLF, bare LF, bare CR) are first
  canonicalised to CRLF as RFC 2046 §4.1.1 requires for ``text/*``; decoding a
  part therefore gives the original text with every line break as CRLF (or LF
  after the usual universal-newline normalisation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email import errors
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

import html2text
import idna

__all__ = [
    "OutgoingMessage",
    "ascii_domain",
    "build",
    "html_to_text",
    "is_html",
    "sending_domain",
]


class _BuildPolicy(email_policy.EmailPolicy):
    """``policy.SMTP`` for messages whose headers this module pre-folds.

    The generator reads Content-Type and Content-Transfer-Encoding back while
    writing; handing it the raw string (as ``compat32`` does) skips a full
    header parse per read, which was a third of the build time.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        if hasattr(value, "name"):
            return value
        return value.replace("\r", "").replace("\n", "")


# Same settings as ``policy.SMTP`` (EmailPolicy with CRLF) plus an explicit
# 78-char limit; ``refold_source="none"`` emits our pre-folded values
# untouched instead of letting the 3.11 folder rework long ones.
_POLICY = _BuildPolicy(linesep="\r\n", max_line_length=78, refold_source="none")

_CRLF = "\r\n"
_MAX_LINE = 78  # RFC 5322 §2.1.1 "SHOULD"
_HARD_MAX_LINE = 998  # RFC 5322 §2.1.1 "MUST", excluding CRLF
_EW_MAX = 75  # RFC 2047 §2
_EW_OVERHEAD = len("=?utf-8?b??=")

# Address headers users may add; Bcc is excluded because the built message
# goes to every recipient, so a Bcc header would disclose the blind copies.
_EXTRA_ADDRESS_HEADERS = frozenset({"reply-to", "cc", "sender"})
_MANAGED_HEADERS = frozenset({"from", "to", "subject", "date", "message-id", "mime-version"})
_FORBIDDEN_EXTRA_HEADERS = _MANAGED_HEADERS | {"bcc"}
# RFC 5322 §3.6: at most one of each.
_SINGLE_HEADERS = frozenset({"sender", "reply-to", "cc", "in-reply-to", "references"})

_FIELD_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ":"
_LINE_BREAK = re.compile(r"[\r\n]")
# Emitted verbatim, so anything that a reader could take as a line break or
# that is not text (C0 controls except HTAB, DEL) is refused.
_UNSAFE_VERBATIM = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PLAIN_WORDS = re.compile(r"[!-~]+(?: [!-~]+)*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOM_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_PRINTABLE_ASCII = re.compile(r"[ -~]*")
# Non-ASCII except surrogates and the characters str.isspace() accepts, which
# the full parser strips or splits on.
_NON_ASCII = r"[^\x00-\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ud800-\udfff]"
_SIMPLE_WORD = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]|{_NON_ASCII})+"
_SIMPLE_LOCAL = _DOT_ATOM.pattern
_SIMPLE_DOMAIN = rf"(?:[A-Za-z0-9-]|{_NON_ASCII})+(?:\.(?:[A-Za-z0-9-]|{_NON_ASCII})+)*"
_SIMPLE_MAILBOX = re.compile(
    rf"""[ \t]*(?:
        (?P<name>{_SIMPLE_WORD}(?:\ {_SIMPLE_WORD})*)[ \t]*
        <(?P<local>{_SIMPLE_LOCAL})@(?P<domain>{_SIMPLE_DOMAIN})>
      | (?P<bare_local>{_SIMPLE_LOCAL})@(?P<bare_domain>{_SIMPLE_DOMAIN})
    )[ \t]*""",
    re.VERBOSE,
)
# A lone "." ends SMTP DATA if a relay forgets dot-stuffing; "From " gets
# rewritten to ">From " by mbox-style relays, breaking the DKIM body hash.
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")

_HTML_STRONG_TAGS = (
    "html|head|body|meta|title|style|p|br|hr|div|span|b|i|u|em|strong|font|center|"
    "table|thead|tbody|tfoot|tr|td|th|ul|ol|li|dl|dt|dd|h[1-6]|img|blockquote|pre|"
    "sup|sub|tt|strike|wbr"
)
# Words that also serve as plain-text placeholders ("send to <address>"): only
# HTML when closed or given an attribute.
_HTML_WEAK_TAGS = (
    "a|abbr|address|article|aside|big|button|caption|cite|code|col|colgroup|del|"
    "details|figcaption|figure|footer|form|header|input|ins|label|link|main|mark|"
    "nav|picture|q|s|section|small|source|summary|time|video|audio|svg"
)
_HTML_RE = re.compile(
    rf"""<(?:
        /?(?:{_HTML_STRONG_TAGS})(?:\s[^<>]*)?/?
      | /(?:{_HTML_WEAK_TAGS})\s*
      | (?:{_HTML_WEAK_TAGS})\s[^<>=]*=[^<>]*
      | !doctype\s+html\b[^<>]*
    )>""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True)
class OutgoingMessage:
    """A stored message, ready to be turned into bytes by :func:`build`.

    ``from_header`` / ``to_header`` are ``addr`` or ``Name <addr>`` (``to_header``
    may list several, comma-separated); ``message_id`` is the local id (a
    dot-atom such as a uuid hex); ``created_at`` must be timezone-aware.
    """

    message_id: str
    from_header: str
    to_header: str
    subject: str
    body: str
    created_at: datetime
    extra_headers: tuple[tuple[str, str], ...] = ()


# --------------------------------------------------------------------------
# Domains and addresses


@lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The A-label (punycode) form of ``domain``, as headers and DKIM need it.

    ASCII domains are returned unchanged (case included): no IDNA mapping is
    needed and re-casing them would alter the user's header for no benefit.
    """
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"invalid internationalised domain {domain!r}: {exc}") from exc


def sending_domain(from_header: str) -> str:
    """The lowercased domain of the single From address.

    An IDN domain is returned as given (U-label, lowercased), not converted
    to punycode; callers that need ASCII (Message-ID, DKIM ``d=``) use
    :func:`ascii_domain` on the result.
    """
    mailboxes = _parse_mailboxes(from_header)
    if len(mailboxes) != 1:
        raise ValueError(f"From must hold exactly one address, got {len(mailboxes)}")
    return mailboxes[0].domain.lower()


@lru_cache(maxsize=4096)
def _parse_mailboxes(value: str) -> tuple[Address, ...]:
    _reject_line_breaks("address", value)
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple is not None and "=?" not in value:
        return (_simple_mailbox(simple),)
    return _parse_mailboxes_fully(value)


def _simple_mailbox(match: re.Match[str]) -> Address:
    # The full parser costs ~0.3 ms; "Name <a@b>" / "a@b" with plain words is
    # most traffic and parses identically (asserted by the tests).
    return Address(
        display_name=match["name"] or "",
        username=match["local"] or match["bare_local"],
        domain=match["domain"] or match["bare_domain"],
    )


def _parse_mailboxes_fully(value: str) -> tuple[Address, ...]:
    try:
        header: Any = email_policy.default.header_factory("To", value)
    except Exception as exc:  # the 3.11 parser crashes on some input, e.g. "a@"
        raise ValueError(f"invalid address {value!r}: {exc!r}") from exc
    for group in header.groups:
        if group.display_name is not None:
            raise ValueError(f"address groups are not supported: {value!r}")
    mailboxes: tuple[Address, ...] = header.addresses
    for mailbox in mailboxes:
        if not mailbox.username.isascii():
            raise ValueError(
                f"non-ASCII local part in {mailbox.addr_spec!r} needs SMTPUTF8, "
                "which SendKit does not use"
            )
    # A period in a display name is obsolete syntax but common ("John Q. Doe").
    defects = [d for d in header.defects if not isinstance(d, errors.ObsoleteHeaderDefect)]
    if defects:
        raise ValueError(f"invalid address {value!r}: {defects[0]}")
    if not mailboxes:
        raise ValueError(f"no address in {value!r}")
    for mailbox in mailboxes:
        if not mailbox.username or not mailbox.domain:
            raise ValueError(f"incomplete address {mailbox.addr_spec!r} in {value!r}")
    return mailboxes


# --------------------------------------------------------------------------
# Header encoding


def _reject_line_breaks(name: str, value: str) -> None:
    if _LINE_BREAK.search(value):
        raise ValueError(f"{name} header value must not contain CR or LF: {value!r}")


def _encoded_words(text: str, first_max: int) -> list[str]:
    """RFC 2047 "B" words for ``text``; the first fits in ``first_max`` chars."""
    data = text.encode("utf-8")
    words: list[str] = []
    start = 0
    # At least 6 payload bytes so that a 4-byte character always fits.
    limit = max(first_max - _EW_OVERHEAD, 8) // 4 * 3
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1  # never split a UTF-8 sequence across words
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode('ascii')}?=")
        start = end
        limit = (_EW_MAX - _EW_OVERHEAD) // 4 * 3
    return words


def _fold(name: str, tokens: Iterable[str]) -> str:
    """Join ``tokens`` with single spaces, folding before a space past 78 chars.

    Folding only ever inserts CRLF in front of an existing space, so unfolding
    restores the value exactly; an empty token (from a run of spaces) is
    never put first on a line, so no continuation line is whitespace-only.
    """
    parts: list[str] = []
    width = len(name) + 2
    for token in tokens:
        if not parts:
            parts.append(token)
            width += len(token)
        elif token and width + 1 + len(token) > _MAX_LINE:
            parts.append("\r\n " + token)
            width = 1 + len(token)
        else:
            parts.append(" " + token)
            width += 1 + len(token)
    value = "".join(parts)
    if any(len(line) > _HARD_MAX_LINE for line in f"{name}: {value}".split("\r\n")):
        raise ValueError(f"{name} header has a part too long to fold under 998 octets")
    return value


def _unstructured(name: str, value: str) -> str:
    if not value:
        return ""
    # Raw only when unfolding gives the exact text back and no reader could
    # see an encoded-word; anything else is encoded as a whole.
    if "=?" not in value and _PLAIN_WORDS.fullmatch(value):
        words = value.split(" ")
        if max(map(len, words)) + len(name) + 2 <= _HARD_MAX_LINE:
            return _fold(name, words)
    return _fold(name, _encoded_words(value, _MAX_LINE - len(name) - 2))


def _phrase_tokens(display_name: str, first_max: int) -> list[str]:
    # "=?" must never appear raw: readers would decode it as an encoded-word.
    if "=?" not in display_name and len(display_name) <= 256:
        if _ATOM_PHRASE.fullmatch(display_name):
            return display_name.split(" ")
        if _PRINTABLE_ASCII.fullmatch(display_name):
            escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
            # FWS is allowed inside a quoted-string: fold it at its spaces.
            return f'"{escaped}"'.split(" ")
    return _encoded_words(display_name, first_max)


def _addr_spec(mailbox: Address) -> str:
    local = mailbox.username
    if not _DOT_ATOM.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{ascii_domain(mailbox.domain)}"


@lru_cache(maxsize=4096)
def _address_header(name: str, value: str) -> str:
    tokens: list[str] = []
    mailboxes = _parse_mailboxes(value)
    for index, mailbox in enumerate(mailboxes):
        addr_spec = _addr_spec(mailbox)
        if mailbox.display_name:
            first_max = _MAX_LINE - len(name) - 2 if index == 0 else _EW_MAX
            tokens += _phrase_tokens(mailbox.display_name, first_max)
            tokens.append(f"<{addr_spec}>")
        else:
            tokens.append(addr_spec)
        if index < len(mailboxes) - 1:
            tokens[-1] += ","
    return _fold(name, tokens)


def _message_id_header(message_id: str, from_header: str) -> str:
    if not _DOT_ATOM.fullmatch(message_id) or len(message_id) > 200:
        raise ValueError(f"message_id must be a short dot-atom (e.g. uuid hex): {message_id!r}")
    # sending_domain() also enforces a single From mailbox (RFC 5322 §3.6.2).
    return f"<{message_id}@{ascii_domain(sending_domain(from_header))}>"


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date_header(created_at: datetime) -> str:
    """`email.utils.format_datetime(created_at)`, with its zone ("+0000") formatted here
    for a whole-minute offset: it asks `strftime("%z")`, whose wrapper was 2 % of a
    delivery's CPU."""
    offset = created_at.utcoffset()
    if offset is None:
        raise ValueError("created_at must be timezone-aware")
    minutes, rest = divmod(int(offset.total_seconds()), 60)
    if rest or offset.microseconds:
        return format_datetime(created_at)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    d = created_at
    return (
        f"{_DAY_NAMES[d.weekday()]}, {d.day:02d} {_MONTH_NAMES[d.month - 1]} {d.year:04d} "
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d} {sign}{hours:02d}{minutes:02d}"
    )


def _extra_header(name: str, value: str) -> str:
    _reject_line_breaks(name, value)
    if value.isascii():
        if _UNSAFE_VERBATIM.search(value):
            raise ValueError(f"{name} header value contains control characters: {value!r}")
        if len(name) + 2 + len(value) > _HARD_MAX_LINE:
            raise ValueError(f"{name} header is longer than 998 octets")
        return value
    return _unstructured(name, value)


def _check_extra_headers(extra: tuple[tuple[str, str], ...]) -> None:
    seen: set[str] = set()
    for name, _value in extra:
        key = name.lower()
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if key in _FORBIDDEN_EXTRA_HEADERS or key.startswith("content-"):
            raise ValueError(f"header {name!r} cannot be set as an extra header")
        if key in _SINGLE_HEADERS and key in seen:
            raise ValueError(f"header {name!r} may appear only once")
        seen.add(key)


def _headers(msg: OutgoingMessage) -> list[tuple[str, str]]:
    _reject_line_breaks("Subject", msg.subject)
    _check_extra_headers(msg.extra_headers)
    headers = [
        ("From", _address_header("From", msg.from_header)),
        ("To", _address_header("To", msg.to_header)),
        ("Subject", _unstructured("Subject", msg.subject)),
        ("Date", _date_header(msg.created_at)),
        ("Message-ID", _message_id_header(msg.message_id, msg.from_header)),
        ("MIME-Version", "1.0"),
    ]
    for name, value in msg.extra_headers:
        if name.lower() in _EXTRA_ADDRESS_HEADERS:
            headers.append((name, _address_header(name, value)))
        else:
            headers.append((name, _extra_header(name, value)))
    return headers


# --------------------------------------------------------------------------
# Bodies


def is_html(body: str) -> bool:
    """Whether ``body`` contains recognisable HTML markup.

    Only known tag names count, written as HTML writes them (no space after
    ``<``), so ``a < b and c > d`` or ``<john@example.com>`` stay plain text.
    Placeholder-like names (``<address>``, ``<code>``, ``<a>``...) count only
    when closed or given an attribute.
    """
    return _HTML_RE.search(body) is not None


class _TextConverter(html2text.HTML2Text):
    def handle_tag(self, tag: str, attrs: dict[str, str | None], start: bool) -> None:
        super().handle_tag(tag, attrs, start)
        if not start and tag in ("td", "th"):
            # With ignore_tables, adjacent cells run together ("Price12 €").
            self.space = True


def _html_converter() -> html2text.HTML2Text:
    converter = _TextConverter()
    # No hard wrapping: QP soft breaks keep lines short on the wire and
    # readers re-flow; wrapping would also split long URLs.
    converter.body_width = 0
    converter.unicode_snob = True  # keep "é", "’" instead of ASCII stand-ins
    converter.images_to_alt = True  # tracking pixels vanish, logos keep alt text
    converter.ignore_emphasis = True  # "**" / "_" markers are noise in mail
    converter.ignore_tables = True  # email tables are layout, not data
    return converter


def html_to_text(html: str) -> str:
    """The text/plain alternative derived from an HTML body.

    Markdown-flavoured (``[label](url)``, ``# Heading``, ``* item``), unwrapped,
    with markdown hard-break spaces and runs of blank lines removed.
    """
    # HTML2Text keeps parser state: a fresh instance per call is also thread-safe.
    text = _html_converter().handle(html)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n"


def _canonical_utf8(text: str) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"body is not encodable as UTF-8: {exc}") from exc
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _base64_size(size: int) -> int:
    encoded = 4 * ((size + 2) // 3)
    return encoded + (encoded + 75) // 76


# A campaign sends one body to many recipients: its encoding (QP and the checks around
# it, ~10 % of a delivery's CPU for 1 KB) is done once. Bodies up to 64 K characters are
# kept, 32 of them at most (a few MB with their encodings); a miss costs a hash.
_CACHED_BODY_CHARS = 65_536


def _encode_body(text: str) -> tuple[str, str]:
    if len(text) <= _CACHED_BODY_CHARS:
        return _encode_body_cached(text)
    return _encode_body_once(text)


def _encode_body_once(text: str) -> tuple[str, str]:
    """``(cte, payload)``: the body as quoted-printable, or base64 when shorter.

    ``binascii.b2a_qp`` keeps lines to 76 chars, escapes NUL and controls, and
    escapes a lone "." line as "=2E"; with CR/LF canonicalised away first it
    cannot emit a bare CR or LF.  Should a "." or "From " line still come out,
    base64 is used instead.  The payload uses ``\\n``; the generator writes
    CRLF.
    """
    data = _canonical_utf8(text)
    qp = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    if qp and not qp.endswith(b"\n"):
        qp += b"=\n"  # soft break: the part ends with CRLF, the text does not
    crlf_size = len(data) + data.count(b"\n")
    if len(qp) <= _base64_size(crlf_size) and not _fragile_line(qp):
        return "quoted-printable", qp.decode("ascii")
    # base64 carries the canonical form itself, so line breaks must be CRLF.
    return "base64", base64.encodebytes(data.replace(b"\n", b"\r\n")).decode("ascii")


def _fragile_line(text: bytes) -> bool:
    """Whether a line of `text` (LF line ends) is a lone "." or starts with "From ":
    what a regex search in multi-line mode found, by substring tests (the search tried
    every position, 5 µs for a 1 KB body)."""
    return (
        text == b"."
        or text.startswith((b".\n", b"From "))
        or text.endswith(b"\n.")
        or b"\n.\n" in text
        or b"\nFrom " in text
    )


_encode_body_cached = lru_cache(maxsize=32)(_encode_body_once)


def _set_text(part: MIMEPart, text: str, subtype: str) -> None:
    cte, payload = _encode_body(text)
    part.set_raw("Content-Type", f"text/{subtype}; charset=utf-8")
    part.set_raw("Content-Transfer-Encoding", cte)
    part.set_payload(payload)


def _boundary(message_id: str) -> str:
    # Neither QP (which writes "=" only as "=XX" or a soft break) nor base64
    # can produce "=_", so the boundary never collides with a part; deriving
    # it from the id keeps builds reproducible.
    digest = hashlib.blake2s(message_id.encode("utf-8"), digest_size=12).hexdigest()
    return f"=_sk{digest}"


# html2text is ~85% of an HTML build; campaigns often send one body to many.
_cached_html_to_text = lru_cache(maxsize=32)(html_to_text)


def _set_alternative(message: EmailMessage, html: str, message_id: str) -> None:
    text_part = MIMEPart(policy=_POLICY)
    _set_text(text_part, _cached_html_to_text(html), "plain")
    html_part = MIMEPart(policy=_POLICY)
    _set_text(html_part, html, "html")
    boundary = _boundary(message_id)
    message.set_raw("Content-Type", f'multipart/alternative;\r\n boundary="{boundary}"')
    message.set_payload([text_part, html_part])


def build(msg: OutgoingMessage) -> bytes:
    """The complete message as CRLF-terminated bytes, ready for DKIM and SMTP.

    Raises ``ValueError`` for input that cannot be represented safely
    (CR/LF in headers, malformed or non-ASCII-local-part addresses, naive
    ``created_at``, forbidden or malformed extra headers).
    """
    headers = _headers(msg)
    if not is_html(msg.body):
        return _single_part(headers, msg.body)
    message = EmailMessage(policy=_POLICY)
    for name, value in headers:
        message.set_raw(name, value)
    _set_alternative(message, msg.body, msg.message_id)
    return message.as_bytes()


def _single_part(headers: list[tuple[str, str]], text: str) -> bytes:
    """What ``EmailMessage.as_bytes()`` writes for a text/plain message (each pre-folded
    header as is, CRLF line ends), without the generator: a fifth of a delivery's CPU
    went to building messages, most of it there."""
    cte, payload = _encode_body(text)
    headers = [
        *headers,
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", cte),
    ]
    lines = [f"{name}: {_CRLF.join(value.splitlines())}\r\n" for name, value in headers]
    lines += ["\r\n", payload.replace("\n", "\r\n")]
    return "".join(lines).encode("ascii", "surrogateescape")
