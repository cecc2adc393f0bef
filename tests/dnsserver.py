"""A tiny authoritative DNS server on 127.0.0.1 for domain verification tests.

Answers TXT and MX questions from a dict that the test fills in ("publishing" records);
everything else gets NXDOMAIN. It runs in a thread, so sync (browser) and async tests can
share it, and it never sends anything anywhere but back to the asking socket.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class Zone:
    # (lower-case name without the final dot, "TXT" | "MX") -> record texts
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, name: str, rdtype: str, value: str) -> None:
        with self.lock:
            self.records.setdefault((name.lower().rstrip("."), rdtype), []).append(value)

    def publish_all(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.publish(record["name"], record["type"], record["value"])

    def answer(self, name: str, rdtype: str) -> list[str] | None:
        with self.lock:
            return self.records.get((name.lower().rstrip("."), rdtype))


def _txt(value: str) -> str:
    # TXT strings are at most 255 bytes each: split long values (DKIM keys) in chunks.
    chunks = [value[i : i + 200] for i in range(0, len(value), 200)] or [""]
    return " ".join('"' + c.replace('"', '\\"') + '"' for c in chunks)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        values = self.server.zone.answer(name, rdtype)
        if values is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            texts = [_txt(v) if rdtype == "TXT" else v.rstrip(".") + "." for v in values]
            response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, texts))
        sock.sendto(response.to_wire(), self.client_address)


class _Server(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, zone: Zone) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.zone = zone


@dataclass
class DnsServer:
    zone: Zone
    port: int

    @property
    def nameserver(self) -> str:
        """For `SENDKIT_DNS_NAMESERVER`."""
        return f"127.0.0.1:{self.port}"


@contextmanager
def dns_server() -> Iterator[DnsServer]:
    zone = Zone()
    server = _Server(zone)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield DnsServer(zone, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
