"""Turning untrusted input into typed values, with errors that name the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sendkit.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], params: Mapping[str, Any]) -> M:
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(p) for p in err["loc"]) or "request"
    kind = err["type"]
    if kind == "missing":
        return f"Bad request parameters: '{field}' is required"
    if kind == "extra_forbidden":
        return f"Bad request parameters: '{field}' is not a known field"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"Bad request parameters: '{field}' {msg[0].lower() + msg[1:] if msg else 'is invalid'}"


def no_crlf(value: str) -> str:
    """Header values must not carry line breaks: that is how headers get injected."""
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain CR or LF")
    return value
