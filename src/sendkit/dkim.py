"""DKIM signing (RFC 6376): rsa-sha256 with relaxed/relaxed canonicalization.

Canonicalization and header selection are plain Python; only the RSA step goes
through OpenSSL (via ``cryptography``). dkimpy does RSA in pure Python, which is
~20x slower and made signing the bottleneck of delivery. ``cryptography`` also
releases the GIL while signing, so ``sign`` scales across threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "SIGNED_HEADERS",
    "DkimKey",
    "generate_private_key",
    "public_key_record",
    "sign",
]

SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    # RFC 8058 one-click unsubscribe only counts when both are covered by DKIM.
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
_SIGNED_LOWER: tuple[bytes, ...] = tuple(name.lower().encode("ascii") for name in SIGNED_HEADERS)

# RFC 5322 §2.1.1 asks for lines of at most 78 characters; stay strictly below.
_MAX_LINE = 76
# RFC 8301 §3.2: verifiers must reject keys shorter than 1024 bits.
_MIN_KEY_BITS = 1024
_KEY_CACHE_SIZE = 256

# A field ends at a CRLF that is not followed by WSP (which would be a fold).
_FIELD_BREAK = re.compile(rb"\r\n(?![ \t])")
# ftext (RFC 5322 §3.6.8), plus the obsolete WSP allowed before the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# LDH only: d= and s= are copied verbatim into the header, so anything looser
# would let a caller inject tags or line breaks.
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

# Stateless, so one instance serves every call.
_PADDING = padding.PKCS1v15()
_HASH = hashes.SHA256()


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    # Kept out of repr so that logging a key never leaks the secret.
    private_key_pem: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for label, value in (("domain", self.domain), ("selector", self.selector)):
            if len(value) > 253 or not _DNS_NAME.fullmatch(value):
                raise ValueError(f"invalid DKIM {label}: {value!r}")


def generate_private_key() -> bytes:
    """Return a new 2048-bit RSA key as unencrypted PKCS#8 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def public_key_record(private_key_pem: bytes) -> str:
    """Return the TXT value to publish at ``<selector>._domainkey.<domain>``."""
    der = (
        _load_private_key(private_key_pem)
        .public_key()
        .public_bytes(
            encoding=serialization.Encoding.DER,
            format=serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def sign(message: bytes, key: DkimKey, now: int) -> bytes:
    """Return the folded, CRLF-terminated ``DKIM-Signature`` field for ``message``.

    ``message`` is a complete RFC 5322 message with CRLF line endings; prepend the
    result to it unchanged. Raises ValueError for a message that has no From (or
    more than one), bare CR/LF characters, or a malformed header section.
    """
    if not isinstance(now, int) or now < 0:
        raise ValueError("now must be a non-negative Unix timestamp")
    head, body = _split_message(message)
    names, fields = _select_headers(_parse_fields(head))
    body_hash = base64.b64encode(hashlib.sha256(_canonical_body(body)).digest()).decode()
    unsigned = _signature_field(key, now, names, body_hash)
    signed_data = b"".join(fields) + _relaxed_field(
        b"dkim-signature", unsigned.encode("ascii").partition(b":")[2]
    )
    private_key = _load_private_key(key.private_key_pem)
    signature = base64.b64encode(private_key.sign(signed_data, _PADDING, _HASH)).decode()
    return (unsigned + _fold_b64(signature, first_used=len(" b=")) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def _load_private_key(private_key_pem: bytes) -> rsa.RSAPrivateKey:
    # Parsing and validating an RSA key costs more than a signature; a delivery
    # worker signs thousands of messages with the same few keys.
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError is how cryptography reports an encrypted key; callers of
        # sign() should only ever have to handle ValueError.
        raise ValueError(f"DKIM key is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("DKIM key must be an RSA private key")
    if key.key_size < _MIN_KEY_BITS:
        raise ValueError(f"RSA key too small for DKIM: {key.key_size} bits")
    return key


def _split_message(message: bytes) -> tuple[bytes, bytes]:
    # A bare CR or LF would be rewritten in transit (SMTP forbids them), and the
    # signature would then no longer match what the recipient receives.
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        raise ValueError("message must use CRLF line endings (found a bare CR or LF)")
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return message.removesuffix(b"\r\n"), b""
    return head, body


def _parse_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """Split the header section into (lowercased name, raw value) pairs."""
    if not head:
        return []
    fields = []
    for raw in _FIELD_BREAK.split(head):
        name, colon, value = raw.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"malformed header line: {raw[:60]!r}")
        fields.append((name.rstrip(b" \t").lower(), value))
    return fields


def _select_headers(fields: list[tuple[bytes, bytes]]) -> tuple[list[str], list[bytes]]:
    """Return the h= names and the canonical fields to hash, in h= order."""
    present: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        if name in _SIGNED_LOWER:
            present.setdefault(name, []).append(value)
    from_count = len(present.get(b"from", ()))
    if from_count != 1:
        raise ValueError(f"message must have exactly one From header, found {from_count}")
    names: list[str] = []
    hashed: list[bytes] = []
    for name in _SIGNED_LOWER:
        # RFC 6376 §5.4.2: repeated names are matched from the bottom up.
        for value in reversed(present.get(name, ())):
            names.append(name.decode("ascii"))
            hashed.append(_relaxed_field(name, value) + b"\r\n")
        if name == b"from":
            # Oversigning: this extra entry matches nothing now, so a From
            # added later would be hashed and break the signature.
            names.append("from")
    return names, hashed


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2; ``name`` must already be lowercased, no CRLF is appended."""
    return name + b":" + _collapse_wsp(value.replace(b"\r\n", b"")).strip(b" ")


def _canonical_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 (an empty body stays empty, unlike "simple")."""
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        # SMTP adds this CRLF in transit; strip WSP on the last line as the
        # recipient will see it.
        body += b"\r\n"
    # Collapsing first leaves at most one SP before each CRLF, so a plain
    # replace strips trailing WSP in linear time (a "[ \t]+\r\n" regex is
    # quadratic on long runs of spaces).
    body = _collapse_wsp(body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _collapse_wsp(data: bytes) -> bytes:
    """Turn every run of SP/HTAB into a single SP."""
    # bytes.replace runs at C speed and each pass halves every run, so this is
    # several times faster than re.sub, which pays per match and per byte.
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def _signature_field(key: DkimKey, now: int, names: list[str], body_hash: str) -> str:
    """The DKIM-Signature field up to an empty ``b=``, folded as it will be sent.

    What gets hashed is exactly this text, so folding can be chosen freely.
    """
    lines = ["DKIM-Signature:"]
    for tag in ("v=1;", "a=rsa-sha256;", "c=relaxed/relaxed;"):
        _append_word(lines, tag, " ")
    _append_word(lines, f"d={key.domain};", " ")
    _append_word(lines, f"s={key.selector};", " ")
    _append_word(lines, f"t={now};", " ")
    # Break only after a colon: h= allows FWS around colons, not inside a name.
    words = [f"{name}:" for name in names]
    words[0] = "h=" + words[0]
    words[-1] = words[-1][:-1] + ";"
    for index, word in enumerate(words):
        _append_word(lines, word, "" if index else " ")
    _append_word(lines, f"bh={body_hash};", " ")
    # b= starts its own line so the folding above never depends on its value.
    lines.append(" b=")
    return "\r\n".join(lines)


def _append_word(lines: list[str], word: str, separator: str) -> None:
    if len(lines[-1]) + len(separator) + len(word) <= _MAX_LINE:
        lines[-1] += separator + word
    else:
        lines.append(" " + word)


def _fold_b64(value: str, first_used: int) -> str:
    # Base64 in b= may be split anywhere; verifiers drop the FWS.
    width = _MAX_LINE - 1
    first = _MAX_LINE - first_used
    chunks = [value[:first]]
    chunks += [" " + value[i : i + width] for i in range(first, len(value), width)]
    return "\r\n".join(chunks)


# --- where signing runs -----------------------------------------------------------------

# Threads below the event loops' priority: under a burst of API requests the CPU goes to
# answering them, and signing (the bulk of a delivery's CPU) catches up as the burst ends.
# CFS still gives these threads about a tenth of a busy core, so delivery never stops.
SIGNING_NICENESS = 10
_signing_pool: ThreadPoolExecutor | None = None
_below_the_loop = True


def keep_signing_at_process_priority() -> None:
    """For a process that only delivers (already niced as a whole, no API to make way
    for): a signing thread below its own loop gets preempted while it holds the GIL,
    and the loop waits for it (measured: about 4 % of end-to-end throughput)."""
    global _below_the_loop
    _below_the_loop = False


def signs_below_the_loop() -> bool:
    return _below_the_loop


def _lower_priority() -> None:
    # Not Linux (a thread id is no process id there), or not allowed: normal priority.
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + SIGNING_NICENESS))


def signing_pool() -> ThreadPoolExecutor:
    """The process's signing threads (OpenSSL releases the GIL while it signs)."""
    global _signing_pool
    if _signing_pool is None:
        workers = max(2, os.cpu_count() or 1)
        _signing_pool = ThreadPoolExecutor(
            workers,
            thread_name_prefix="sendkit-dkim",
            initializer=_lower_priority if _below_the_loop else None,
        )
    return _signing_pool


async def sign_in_pool(message: bytes, key: DkimKey, now: int) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(signing_pool(), sign, message, key, now)
