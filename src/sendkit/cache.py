"""A small time-bounded cache for the lookups every API request repeats (key, sender).

Writes in this process clear it at once; another process's writes (a CLI command, a second
API process) are seen within `ttl` seconds. `ttl=0` turns caching off.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

_MAX_ENTRIES = 10_000


class TtlCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()  # cheaper than LRU bookkeeping on the hot path
        self._entries[key] = (time.monotonic() + self.ttl, value)

    def clear(self) -> None:
        self._entries.clear()
