"""Outbound HTTP that cannot be pointed at the inside of the network (SSRF).

A webhook URL is chosen by a customer, so a request to it must never reach loopback,
private, link-local (cloud metadata at 169.254.169.254), multicast or otherwise
non-global addresses, unless the operator allows a range explicitly. Checking the name
when the URL is saved is not enough: DNS can answer differently later (rebinding). So
the check happens at connection time, inside the HTTP client's network backend: resolve,
check every address, then connect to an address that was checked. TLS still verifies
the certificate against the URL's host name, because only the TCP connect changes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(httpcore.ConnectError):
    """The destination resolves to an address outbound requests may not reach."""


def parse_networks(spec: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """`"127.0.0.0/8, ::1"` (or a list) as networks; raises ValueError on a bad entry."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(ipaddress.ip_network(i.strip(), strict=False) for i in items if i.strip())


def _unmapped(ip: IPAddress) -> IPAddress:
    # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address it carries.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_allowed(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> bool:
    """Global unicast only, unless an allowed range contains the address."""
    ip = _unmapped(ip)
    if any(ip in net for net in allow if net.version == ip.version):
        return True
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if ip not in seen:
            seen.append(ip)
    return seen


async def checked_addresses(host: str, port: int, allow: Sequence[IPNetwork]) -> list[IPAddress]:
    """Resolve and check; any address that may not be reached refuses the whole name, so
    a DNS answer mixing a public and a private address cannot be used to get in."""
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    if not addresses:
        raise httpcore.ConnectError(f"{host} has no address")
    for ip in addresses:
        if not is_allowed(ip, allow):
            raise BlockedAddress(f"{host} resolves to {ip}, which outbound requests may not reach")
    return addresses


async def check_url(url: str, allow: Sequence[IPNetwork]) -> None:
    """For saving a URL: http(s), a host, and only reachable addresses. ValueError if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("has an invalid port") from None
    try:
        await checked_addresses(parts.hostname, port, allow)
    except BlockedAddress as exc:
        raise ValueError(f"points to an internal address ({exc})") from None
    except httpcore.ConnectError as exc:
        raise ValueError(f"cannot be resolved ({exc})") from None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check in front of every TCP connect."""

    def __init__(self, allow: Sequence[IPNetwork] = ()) -> None:
        self._allow = tuple(allow)
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await checked_addresses(host, port, self._allow)
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not reachable for outbound requests")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport on a connection pool that uses :class:`GuardedBackend`.

    No proxies (a proxy would connect on our behalf, unchecked) and no environment
    (`HTTP_PROXY`, `SSL_CERT_FILE`...) are honoured.
    """

    def __init__(self, allow: Sequence[IPNetwork] = (), *, max_connections: int = 50) -> None:
        super().__init__(trust_env=False)
        # httpx builds its pool without a way to pass a network backend: replace it.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections // 2,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(allow),
        )


def blocked_reason(exc: BaseException) -> str | None:
    """The message of a :class:`BlockedAddress` behind an httpx error, if that is the cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BlockedAddress):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None
