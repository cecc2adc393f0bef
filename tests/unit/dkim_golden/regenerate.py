"""Regenerate the DKIM golden files used by tests/unit/test_dkim.py.

    .venv/bin/python tests/unit/dkim_golden/regenerate.py            # re-sign, keep the key
    .venv/bin/python tests/unit/dkim_golden/regenerate.py --new-key  # also replace test_key.pem

The messages are defined here (with explicit escapes, so no editor or git
setting can silently strip their whitespace) and written out as .eml files.
Nothing is written unless dkimpy, an independent implementation, accepts every
new signature. Only regenerate on purpose: a changed b= or bh= for an existing
message means the signing output changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import dkim

from sendkit.dkim import DkimKey, generate_private_key, public_key_record, sign

HERE = Path(__file__).resolve().parent
KEY_FILE = HERE / "test_key.pem"
EXPECTED_FILE = HERE / "expected.json"
DOMAIN = "example.com"
SELECTOR = "golden2024"
NOW = 1_700_000_000


def _crlf(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


PLAIN_ASCII = _crlf(
    "From: Alice Example <alice@example.com>",
    "To: Bob Example <bob@example.org>",
    "Subject: Your weekly report",
    "Date: Tue, 14 Nov 2023 22:13:20 +0000",
    "Message-ID: <20231114221320.1@example.com>",
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=us-ascii",
    "Content-Transfer-Encoding: 7bit",
    "List-Unsubscribe: <https://example.com/u/abc123>, <mailto:unsub@example.com?subject=abc123>",
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    "",
    "Hi Bob,",
    "",
    "Here is your weekly report. Nothing unusual happened.",
    "",
    "-- ",
    "Alice",
)

WHITESPACE_FOLDING = _crlf(
    "Received: from mx.example.net by mx.example.com; Tue, 14 Nov 2023 22:13:20 +0000",
    "FROM:   \t Carol  \t Example   <carol@example.com>  ",
    "to: dave@example.org,",
    "   erin@example.org,\t",
    "\tfrank@example.org",
    "Subject: A subject that is   folded",
    " \t  over   several\t\tlines  ",
    "\t and has   trailing space   ",
    "Date:\tTue, 14 Nov 2023 22:13:20 +0000",
    "X-Mailer: not signed  at   all",
    "Message-ID:",
    " <20231114221320.2@example.com>",
    "MIME-Version: 1.0",
    "Content-Type: text/plain;",
    "\tcharset=us-ascii",
    "",
    "  Leading spaces stay (as one space).",
    "Runs   of  spaces\tand\t\ttabs   collapse.  \t ",
    "\t",
    "Line after a whitespace-only line.\t",
    "",
    "   ",
    "Last text line",
    "",
    "  ",
    "\t\t",
    "",
    "",
)

UTF8_MULTIPART = _crlf(
    "From: =?utf-8?q?Zo=C3=AB_M=C3=BCller?= <zoe@example.com>",
    "To: =?utf-8?b?5bGx55Sw5aSq6YOO?= <taro@example.jp>",
    "Subject: =?utf-8?q?Caf=C3=A9_=E2=98=95_und_Gr=C3=BC=C3=9Fe?=",
    "Date: Tue, 14 Nov 2023 22:13:20 +0000",
    "Message-ID: <20231114221320.3@example.com>",
    "MIME-Version: 1.0",
    'Content-Type: multipart/alternative; boundary="=_sendkit_b1"',
    "",
    "This is a multi-part message in MIME format.",
    "",
    "--=_sendkit_b1",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "",
    "Grüße aus Köln! Ein Café ☕ für dich.",
    "日本語のテキストも  大丈夫です。 ",
    "",
    "--=_sendkit_b1",
    "Content-Type: text/html; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "",
    "<html><body>",
    "  <p>Grüße aus <b>Köln</b>! Ein Café ☕ für dich.</p>",
    "  <p>日本語のテキストも大丈夫です。</p>",
    "</body></html>",
    "",
    "--=_sendkit_b1--",
    "",
)

MESSAGES = {
    "plain_ascii": PLAIN_ASCII,
    "whitespace_folding": WHITESPACE_FOLDING,
    "utf8_multipart": UTF8_MULTIPART,
}


def _tag(header: bytes, name: bytes) -> str:
    """A tag's value from a DKIM-Signature field, with folding whitespace removed."""
    unfolded = b"".join(header.split())
    for spec in unfolded.split(b";"):
        key, _, value = spec.partition(b"=")
        if key == name:
            return value.decode("ascii")
    raise KeyError(name)


def _dkimpy_accepts(signed_message: bytes, pem: bytes) -> bool:
    record = public_key_record(pem).encode("ascii")
    return bool(dkim.verify(signed_message, dnsfunc=lambda _name, timeout=5: record))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-key", action="store_true", help="replace test_key.pem")
    args = parser.parse_args()

    pem = generate_private_key() if args.new_key else KEY_FILE.read_bytes()
    key = DkimKey(domain=DOMAIN, selector=SELECTOR, private_key_pem=pem)
    cases = {}
    for name, message in MESSAGES.items():
        header = sign(message, key, NOW)
        if not _dkimpy_accepts(header + message, pem):
            print(f"dkimpy rejected the signature for {name}; nothing written", file=sys.stderr)
            return 1
        cases[name] = {
            "message": f"{name}.eml",
            "message_sha256": hashlib.sha256(message).hexdigest(),
            "now": NOW,
            "bh": _tag(header, b"bh"),
            "b": _tag(header, b"b"),
            "signature": header.decode("ascii"),
        }

    if args.new_key:
        KEY_FILE.write_bytes(pem)
    for name, message in MESSAGES.items():
        (HERE / f"{name}.eml").write_bytes(message)
    expected = {
        "_comment": "Generated by regenerate.py. test_key.pem is a throwaway TEST key.",
        "key": KEY_FILE.name,
        "domain": DOMAIN,
        "selector": SELECTOR,
        "cases": cases,
    }
    EXPECTED_FILE.write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} golden cases to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
