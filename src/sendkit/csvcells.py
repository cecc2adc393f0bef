"""Spreadsheet-safe CSV cells. A cell that starts with = + - @ (or a tab or carriage
return) runs as a formula when a spreadsheet opens the file (CSV injection): exports put
an apostrophe before such a cell, which spreadsheets show as plain text, and imports take
exactly that apostrophe off again, so an export imports back unchanged."""

from __future__ import annotations

from typing import Any

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape(value: Any) -> Any:
    # Also a value that already starts with apostrophes before such a character: one
    # more in front, so that `unescape` gives every value back exactly.
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def unescape(value: str) -> str:
    if value.startswith("'") and value.lstrip("'").startswith(_FORMULA_STARTS):
        return value[1:]
    return value
