"""The `/v1` dependency: checks 1 to 4 of the documented order, then the bounded body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Request

from sendkit import keys
from sendkit.accounts import Account, ensure_usable, utc_today
from sendkit.errors import BadRequest, InvalidSignature, MessageTooLarge
from sendkit.services import Services


@dataclass(frozen=True)
class ApiCall:
    request_id: str
    key: keys.AuthenticatedKey
    body: bytes

    @property
    def account(self) -> Account:
        return self.key.account


def services_of(request: Request) -> Services:
    return request.app.services  # type: ignore[no-any-return]


# The request headers `api_call` reads, found in one pass over the list (ASGI names are
# lower-case): Starlette's `Headers` scans and decodes the whole list on every lookup.
_AUTHORIZATION = b"authorization"
_TIMESTAMP = b"x-sendkit-timestamp"
_SIGNATURE = b"x-sendkit-signature"
_CONTENT_LENGTH = b"content-length"
_READ = frozenset((_AUTHORIZATION, _TIMESTAMP, _SIGNATURE, _CONTENT_LENGTH))


def _read_headers(request: Request) -> dict[bytes, str]:
    """The first value of each header `api_call` reads, as `Headers.get` would give it."""
    found: dict[bytes, str] = {}
    for name, value in request.scope["headers"]:
        if name in _READ and name not in found:
            found[name] = value.decode("latin-1")
    return found


async def api_call(request: Request) -> ApiCall:
    services = services_of(request)
    headers = _read_headers(request)
    key = await keys.authenticate(services.db, services.box, _bearer(headers))
    limit = key.account.max_message_size + services.settings.body_overhead
    timestamp = headers.get(_TIMESTAMP)
    signature = headers.get(_SIGNATURE)
    declared = headers.get(_CONTENT_LENGTH, "")
    body: bytes | None = None
    window = services.settings.signature_window
    if keys.precheck_signature(key, timestamp=timestamp, signature=signature, window=window):
        body = await read_body(request, limit, declared)
        await keys.verify_signature(
            key,
            timestamp=timestamp,
            signature=signature,
            method=request.method,
            path_with_query=_path_with_query(request),
            body=body,
            window=window,
            guard=services.replay_guard,
        )
    ensure_usable(key.account, utc_today())
    rate = await services.limiter.hit(key.account.id, key.account.rate_per_second)
    # The request's own state, as `RequestContext` put it in the scope: `request.state`
    # reaches it through an attribute lookup that fails (an exception) first.
    state = request.scope["state"]
    state["extra_headers"].update(rate.headers())
    if body is None:
        body = await read_body(request, limit, declared)
    return ApiCall(state["request_id"], key, body)


def _bearer(headers: Mapping[bytes, str]) -> str:
    scheme, _, token = headers.get(_AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidSignature("Invalid signature: missing 'Authorization: Bearer <token>'")
    return token.strip()


def _path_with_query(request: Request) -> str:
    path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    query: bytes = request.scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


async def read_body(request: Request, limit: int, declared: str) -> bytes:
    """Refuse an oversized body as it streams in, before it is held in memory whole
    (`declared`: the Content-Length header, or "")."""
    if declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise MessageTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def params(call: ApiCall, request: Request) -> dict[str, Any]:
    """Parameters from the query string and from the body, whichever way they were sent.

    The documented GET example sends `appId=...&page=1` as a body under a JSON content
    type, so the body's own shape decides how it is read, not the header.
    """
    merged: dict[str, Any] = _from_body(call.body)
    if request.scope.get("query_string"):  # parsing an empty one costs more than it seems
        merged.update(request.query_params.items())
    return merged


def _from_body(raw: bytes) -> dict[str, Any]:
    text = raw.strip()
    if not text:
        return {}
    if text[:1] in (b"{", b"["):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise BadRequest("Bad request parameters: the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise BadRequest("Bad request parameters: the body must be a JSON object")
        return value
    try:
        # Lenient like curl users expect: stray or doubled '&' are ignored.
        pairs = parse_qsl(text.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise BadRequest("Bad request parameters: the body is neither JSON nor form data") from None
    return dict(pairs)


def header_safe(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if "\r" not in v and "\n" not in v}
