"""Tests for sendkit.dkim, cross-checked against dkimpy as an independent verifier.

Golden files live in tests/unit/dkim_golden/; regenerate them (deliberately) with
``.venv/bin/python tests/unit/dkim_golden/regenerate.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from sendkit import dkim as sendkit_dkim
from sendkit.dkim import SIGNED_HEADERS, DkimKey, generate_private_key, public_key_record, sign

GOLDEN_DIR = Path(__file__).parent / "dkim_golden"
GOLDEN = json.loads((GOLDEN_DIR / "expected.json").read_text(encoding="utf-8"))
NOW = 1_700_000_000
EMPTY_SHA256_B64 = base64.b64encode(hashlib.sha256(b"").digest()).decode()


def crlf(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


BASIC = crlf(
    "From: Alice <alice@example.com>",
    "To: Bob <bob@example.org>",
    "Subject: Hello",
    "Date: Tue, 14 Nov 2023 22:13:20 +0000",
    "Message-ID: <basic@example.com>",
    "",
    "Hello Bob,",
    "",
    "how are you?",
)


@pytest.fixture(scope="module")
def key() -> DkimKey:
    pem = (GOLDEN_DIR / GOLDEN["key"]).read_bytes()
    return DkimKey(domain=GOLDEN["domain"], selector=GOLDEN["selector"], private_key_pem=pem)


def dns_for(key: DkimKey) -> Callable[..., bytes | None]:
    record = public_key_record(key.private_key_pem).encode("ascii")
    expected_name = f"{key.selector}._domainkey.{key.domain}.".encode("ascii")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == expected_name else None

    return dnsfunc


def dkimpy_verify(signed_message: bytes, key: DkimKey) -> bool:
    return bool(dkim.verify(signed_message, dnsfunc=dns_for(key)))


def strict_verify(signed_message: bytes, key: DkimKey) -> bool:
    """RFC 6376 verification using dkimpy's parser and canonicalizer.

    dkimpy's own verify() always hashes one extra "from" (its bug #644046
    workaround), so it cannot tell whether the signer oversigned From. This
    verifier hashes exactly the h= list.
    """
    message = dkim.DKIM(signed_message)
    sig, include_headers, sig_headers = message.verify_headerprep()
    canon = CanonicalizationPolicy.from_c_value(sig[b"c"])
    body_hash = hashlib.sha256(canon.canonicalize_body(message.body)).digest()
    if body_hash != base64.b64decode(sig[b"bh"]):
        return False
    hasher = hashlib.sha256()
    canonical_headers = canon.canonicalize_headers(message.headers)
    dkim.hash_headers(hasher, canon, canonical_headers, include_headers, sig_headers[0], sig)
    public_key = serialization.load_pem_private_key(key.private_key_pem, None).public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
    try:
        public_key.verify(
            signature, hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256())
        )
    except InvalidSignature:
        return False
    return True


def tags(header: bytes) -> dict[str, str]:
    value = header.partition(b":")[2]
    result = {}
    for spec in b"".join(value.split()).split(b";"):
        if spec:
            name, _, tag_value = spec.partition(b"=")
            result[name.decode()] = tag_value.decode()
    return result


def dkimpy_body_hash(message: bytes, key: DkimKey) -> str:
    header = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.private_key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return tags(header)["bh"]


def replace_header(message: bytes, name: bytes, new_line: bytes) -> bytes:
    pattern = re.compile(rb"^" + name + rb":.*?\r\n(?![ \t])", re.IGNORECASE | re.MULTILINE)
    result, count = pattern.subn(new_line.replace(b"\\", b"\\\\") + b"\r\n", message, count=1)
    assert count == 1, name
    return result


# --- golden files -----------------------------------------------------------


def load_golden(case: str) -> tuple[bytes, dict[str, Any]]:
    expected = GOLDEN["cases"][case]
    message = (GOLDEN_DIR / expected["message"]).read_bytes()
    assert hashlib.sha256(message).hexdigest() == expected["message_sha256"], (
        f"{expected['message']} was altered (line endings or whitespace stripped?); "
        "restore it with tests/unit/dkim_golden/regenerate.py"
    )
    return message, expected


GOLDEN_CASES = sorted(GOLDEN["cases"])


def test_golden_covers_required_samples() -> None:
    assert {"plain_ascii", "whitespace_folding", "utf8_multipart"} <= set(GOLDEN_CASES)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_signature_is_reproduced_exactly(case: str, key: DkimKey) -> None:
    message, expected = load_golden(case)

    header = sign(message, key, expected["now"])

    assert tags(header)["bh"] == expected["bh"]
    assert tags(header)["b"] == expected["b"]
    assert header.decode("ascii") == expected["signature"]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_signature_is_accepted_by_dkimpy(case: str, key: DkimKey) -> None:
    message, expected = load_golden(case)
    signed = expected["signature"].encode("ascii") + message

    assert dkimpy_verify(signed, key)
    assert strict_verify(signed, key)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_body_hash_matches_dkimpy(case: str, key: DkimKey) -> None:
    message, expected = load_golden(case)

    assert dkimpy_body_hash(message, key) == expected["bh"]


# --- verification by dkimpy -------------------------------------------------

VARIANTS = {
    "basic": BASIC,
    "all_signed_headers": crlf(
        "From: Alice <alice@example.com>",
        "To: Bob <bob@example.org>",
        "Subject: Everything",
        "Date: Tue, 14 Nov 2023 22:13:20 +0000",
        "Message-ID: <all@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "List-Unsubscribe: <https://example.com/unsubscribe/0123456789abcdef0123456789abcdef>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "",
        "Body",
    ),
    "only_from": crlf("From: alice@example.com", "", "Body"),
    "mixed_case_names": crlf("fRoM: alice@example.com", "SUBJECT: Shouting", "", "Body"),
    "repeated_to": crlf(
        "From: alice@example.com",
        "To: first@example.org",
        "Subject: Two To fields",
        "To: second@example.org",
        "",
        "Body",
    ),
    "unsigned_headers_interleaved": crlf(
        "Received: by mx1",
        "From: alice@example.com",
        "X-Custom:   whatever  ",
        "Subject: s",
        "Received: by mx2",
        "",
        "Body",
    ),
    "empty_body": crlf("From: alice@example.com", "Subject: empty", ""),
    "no_body_separator": crlf("From: alice@example.com", "Subject: headers only"),
    "body_of_blank_lines": crlf("From: alice@example.com", "", "", " \t", "", ""),
    "body_without_final_crlf": crlf("From: alice@example.com", "") + b"no newline at the end",
    "long_header_values": crlf(
        "From: Somebody With A Very Long Display Name Indeed <somebody.long@example.com>",
        "Subject: " + "word " * 60,
        "",
        "x" * 2000,
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_signature_verifies_with_dkimpy(name: str, key: DkimKey) -> None:
    message = VARIANTS[name]

    signed = sign(message, key, NOW) + message

    assert dkimpy_verify(signed, key)
    assert strict_verify(signed, key)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_body_hash_matches_dkimpy(name: str, key: DkimKey) -> None:
    message = VARIANTS[name]

    assert tags(sign(message, key, NOW))["bh"] == dkimpy_body_hash(message, key)


def test_signature_with_freshly_generated_key_verifies() -> None:
    fresh = DkimKey(
        domain="mail.example.net", selector="s2", private_key_pem=generate_private_key()
    )

    assert dkimpy_verify(sign(BASIC, fresh, NOW) + BASIC, fresh)


# --- tampering --------------------------------------------------------------

TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "subject": lambda m: replace_header(m, b"Subject", b"Subject: Hello!"),
    "subject_case_of_value": lambda m: replace_header(m, b"Subject", b"Subject: hello"),
    "from": lambda m: replace_header(m, b"From", b"From: Alice <alice@evil.example>"),
    "to": lambda m: replace_header(m, b"To", b"To: Mallory <mallory@example.org>"),
    "body_changed": lambda m: m.replace(b"how are you?", b"how are you!"),
    "body_line_appended": lambda m: m + b"P.S. click here\r\n",
    "body_whitespace_inserted_in_word": lambda m: m.replace(b"Hello Bob", b"Hel lo Bob"),
    "second_from_on_top": lambda m: b"From: Mallory <mallory@evil.example>\r\n" + m,
    "second_from_at_bottom": lambda m: m.replace(
        b"\r\n\r\n", b"\r\nFrom: Mallory <mallory@evil.example>\r\n\r\n", 1
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampering_breaks_verification(name: str, key: DkimKey) -> None:
    signed = sign(BASIC, key, NOW) + BASIC
    assert dkimpy_verify(signed, key)

    tampered = TAMPERINGS[name](signed)

    assert tampered != signed
    assert not dkimpy_verify(tampered, key)
    assert not strict_verify(tampered, key)


def test_insignificant_whitespace_changes_still_verify(key: DkimKey) -> None:
    """Relaxed canonicalization is the point: re-folding in transit is harmless."""
    signed = sign(BASIC, key, NOW) + BASIC

    refolded = replace_header(signed, b"Subject", b"subject:\t Hello  ")
    rewrapped = refolded.replace(b"how are you?", b"how   are\tyou?  \t")

    assert dkimpy_verify(rewrapped, key)


def test_from_is_oversigned(key: DkimKey) -> None:
    header = sign(BASIC, key, NOW)

    assert tags(header)["h"].split(":").count("from") == 2


def test_oversigning_matters_without_dkimpy_workaround(key: DkimKey) -> None:
    """A strict verifier accepts an added From unless the signer oversigned."""
    added_from = TAMPERINGS["second_from_on_top"]
    not_oversigned = dkim.sign(
        BASIC,
        key.selector.encode(),
        key.domain.encode(),
        key.private_key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    oversigned = sign(BASIC, key, NOW)

    assert strict_verify(added_from(not_oversigned + BASIC), key)
    assert strict_verify(oversigned + BASIC, key)
    assert not strict_verify(added_from(oversigned + BASIC), key)


# --- header selection -------------------------------------------------------


def test_h_lists_only_present_headers_in_signed_headers_order(key: DkimKey) -> None:
    assert tags(sign(VARIANTS["only_from"], key, NOW))["h"] == "from:from"
    assert tags(sign(VARIANTS["all_signed_headers"], key, NOW))["h"] == ":".join(
        ["from", *(name.lower() for name in SIGNED_HEADERS)]
    )
    assert tags(sign(VARIANTS["unsigned_headers_interleaved"], key, NOW))["h"] == (
        "from:from:subject"
    )


def test_signed_headers_constant() -> None:
    assert SIGNED_HEADERS == (
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    )


def test_repeated_header_is_listed_per_occurrence_and_selected_bottom_up(key: DkimKey) -> None:
    message = VARIANTS["repeated_to"]
    signed = sign(message, key, NOW) + message
    swapped = signed.replace(b"first@", b"TMP@").replace(b"second@", b"first@")
    swapped = swapped.replace(b"TMP@", b"second@")

    assert tags(signed)["h"].split(":").count("to") == 2
    assert dkimpy_verify(signed, key)
    # Hashing order is the bottom-up order, so swapping the two values must fail.
    assert not dkimpy_verify(swapped, key)


# --- output format ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_header_is_folded_crlf_terminated_and_short(name: str, key: DkimKey) -> None:
    header = sign(VARIANTS[name], key, NOW)

    assert header.startswith(b"DKIM-Signature: v=1; ")
    assert header.endswith(b"\r\n")
    assert not header.endswith(b"\r\n\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(len(line) < 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert b"\n" not in header.replace(b"\r\n", b"")


def test_tags(key: DkimKey) -> None:
    found = tags(sign(BASIC, key, 1_234_567_890))

    assert list(found) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]
    assert found["v"] == "1"
    assert found["a"] == "rsa-sha256"
    assert found["c"] == "relaxed/relaxed"
    assert found["d"] == key.domain
    assert found["s"] == key.selector
    assert found["t"] == "1234567890"
    assert len(base64.b64decode(found["b"])) == 256


def test_signing_is_deterministic(key: DkimKey) -> None:
    assert sign(BASIC, key, NOW) == sign(BASIC, key, NOW)


# --- body canonicalization edge cases ---------------------------------------


@pytest.mark.parametrize("name", ["empty_body", "no_body_separator", "body_of_blank_lines"])
def test_empty_body_hashes_as_empty_string(name: str, key: DkimKey) -> None:
    # RFC 6376 §3.4.4: unlike "simple", relaxed does not turn an empty body into CRLF.
    assert tags(sign(VARIANTS[name], key, NOW))["bh"] == EMPTY_SHA256_B64


def test_missing_final_crlf_is_hashed_as_delivered_over_smtp(key: DkimKey) -> None:
    message = crlf("From: alice@example.com", "") + b"trailing blanks on last line \t "
    header = sign(message, key, NOW)

    # SMTP clients terminate the data with CRLF; the signature must hold then.
    assert dkimpy_verify(header + message + b"\r\n", key)
    assert sign(message + b"\r\n", key, NOW) == header


def test_long_whitespace_run_is_fast(key: DkimKey) -> None:
    # Guards against quadratic regexes: re.sub(rb"[ \t]+\r\n", ...) needs over an
    # hour for this body (0.45 s already for 20,000 spaces).
    message = crlf("From: alice@example.com", "") + b" " * 2_000_000 + b"x\r\n"

    assert (
        dkimpy_body_hash(crlf("From: a@example.com", "", " x"), key)
        == tags(sign(message, key, NOW))["bh"]
    )


# --- random bodies ----------------------------------------------------------

_TOKENS = ["word", "Grüße", "日本", "a", "=3D", "--", " ", "  ", "\t", " \t ", "\t\t"]


def random_body(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.15:
            lines.append("")
        elif kind < 0.3:
            lines.append(rng.choice([" ", "\t", "  \t", "\t \t "]))
        else:
            lines.append("".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, 15))))
    lines += [rng.choice(["", " ", "\t", "  "]) for _ in range(rng.randint(0, 3))]
    return "".join(line + "\r\n" for line in lines)


def random_subject(rng: random.Random) -> str:
    words = [rng.choice(["Re:", "news", "für", "you", "x"]) for _ in range(rng.randint(1, 6))]
    separators = [" ", "  ", "\t", " \r\n\t", "\r\n  "]
    return "".join(rng.choice(separators) + word for word in words) + rng.choice(["", " ", "\t"])


@pytest.mark.parametrize("seed", range(50))
def test_random_bodies_verify_with_dkimpy(seed: int, key: DkimKey) -> None:
    rng = random.Random(seed)
    message = crlf(
        "From: alice@example.com",
        "To: bob@example.org",
        "Subject:" + random_subject(rng),
        "",
    ) + random_body(rng).encode("utf-8")

    header = sign(message, key, NOW)

    assert dkimpy_verify(header + message, key)
    assert tags(header)["bh"] == dkimpy_body_hash(message, key)


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        crlf("To: bob@example.org", "Subject: no from", "", "Body"),
        crlf("", "From: alice@example.com"),  # that From is in the body
        b"",
        crlf("X-From: alice@example.com", "", "Body"),
    ],
)
def test_message_without_from_is_rejected(message: bytes, key: DkimKey) -> None:
    with pytest.raises(ValueError, match="From"):
        sign(message, key, NOW)


def test_message_with_two_from_headers_is_rejected(key: DkimKey) -> None:
    message = crlf("From: a@example.com", "From: b@example.com", "", "Body")

    with pytest.raises(ValueError, match="From"):
        sign(message, key, NOW)


@pytest.mark.parametrize(
    "message",
    [
        b"From: alice@example.com\n\nBody\n",
        b"From: alice@example.com\r\n\r\nBody\nmore\r\n",
        b"From: alice@example.com\r\n\r\nBody\rmore\r\n",
    ],
)
def test_bare_cr_or_lf_is_rejected(message: bytes, key: DkimKey) -> None:
    with pytest.raises(ValueError, match="CRLF"):
        sign(message, key, NOW)


@pytest.mark.parametrize(
    "message",
    [
        crlf("From: alice@example.com", "this is not a header", "", "Body"),
        crlf(" continuation first", "From: alice@example.com", "", "Body"),
        crlf("From: alice@example.com", ": empty name", "", "Body"),
    ],
)
def test_malformed_header_section_is_rejected(message: bytes, key: DkimKey) -> None:
    with pytest.raises(ValueError, match="malformed header"):
        sign(message, key, NOW)


def test_negative_time_is_rejected(key: DkimKey) -> None:
    with pytest.raises(ValueError, match="now"):
        sign(BASIC, key, -1)


@pytest.mark.parametrize(
    ("domain", "selector"),
    [
        ("example.com; x=1", "s1"),
        ("example.com", "s1\r\n b=evil"),
        ("", "s1"),
        ("example.com", ""),
        ("-bad.example.com", "s1"),
        ("example.com.", "s1"),
        ("exämple.com", "s1"),
        ("a" * 64 + ".com", "s1"),
    ],
)
def test_invalid_domain_or_selector_is_rejected(domain: str, selector: str, key: DkimKey) -> None:
    with pytest.raises(ValueError, match="invalid DKIM"):
        DkimKey(domain=domain, selector=selector, private_key_pem=key.private_key_pem)


def test_non_rsa_key_is_rejected() -> None:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bad = DkimKey(domain="example.com", selector="s1", private_key_pem=pem)

    with pytest.raises(ValueError, match="RSA"):
        sign(BASIC, bad, NOW)


@pytest.mark.parametrize("pem", [b"not a key", b"encrypted"])
def test_unreadable_key_is_rejected(pem: bytes, key: DkimKey) -> None:
    if pem == b"encrypted":
        loaded = serialization.load_pem_private_key(key.private_key_pem, password=None)
        pem = loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    bad = DkimKey(domain="example.com", selector="s1", private_key_pem=pem)

    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        sign(BASIC, bad, NOW)


# --- keys -------------------------------------------------------------------


def test_generate_private_key_is_2048_bit_pkcs8_pem() -> None:
    pem = generate_private_key()

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    assert loaded.key_size == 2048


def test_public_key_record_publishes_the_matching_public_key(key: DkimKey) -> None:
    record = public_key_record(key.private_key_pem)

    prefix, _, p = record.rpartition("p=")
    assert prefix == "v=DKIM1; k=rsa; "
    published = serialization.load_der_public_key(base64.b64decode(p))
    private = serialization.load_pem_private_key(key.private_key_pem, password=None)
    assert isinstance(published, rsa.RSAPublicKey)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert published.public_numbers() == private.public_key().public_numbers()


def test_key_is_parsed_once_for_many_signatures(
    key: DkimKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_load = serialization.load_pem_private_key

    def counting_load(data: bytes, password: bytes | None) -> Any:
        calls.append(data)
        return real_load(data, password)

    sendkit_dkim._load_private_key.cache_clear()
    monkeypatch.setattr(serialization, "load_pem_private_key", counting_load)
    # Equal but distinct key objects, as a worker rebuilding DkimKey per job would.
    for _ in range(5):
        pem_copy = bytes(bytearray(key.private_key_pem))
        sign(BASIC, DkimKey(key.domain, key.selector, pem_copy), NOW)

    assert len(calls) == 1


def test_repr_does_not_leak_private_key(key: DkimKey) -> None:
    assert "PRIVATE" not in repr(key)
    assert key.domain in repr(key)
