"""Figures, their targets, the printed table and the JSON document."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class Target:
    """`on` the figure's own value or its ratio to the peer, `op` `threshold`."""

    on: Literal["value", "ratio"]
    op: Literal[">=", "<="]
    threshold: float

    def holds(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def describe(self, unit: str) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        if self.on == "ratio":
            return f"ratio {sign} {self.threshold:g}"
        return f"{sign} {self.threshold:g} {unit}"


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    sendkit: float | None
    peer: float | None = None
    peer_name: str | None = None
    target: Target | None = None
    details: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    # Set where both sides ran in rounds: the median of the rounds' own ratios (each
    # round's sides ran one after the other), rather than one median over the other's.
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.sendkit is None or not self.peer:
            return None
        return self.sendkit / self.peer

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.holds(self.ratio if self.target.on == "ratio" else self.sendkit)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "sendkit": _rounded(self.sendkit),
            "peer": _rounded(self.peer),
            "peer_name": self.peer_name,
            "ratio": _rounded(self.ratio, 3),
            "target": None
            if self.target is None
            else {"on": self.target.on, "op": self.target.op, "threshold": self.target.threshold},
            "met": self.met,
            "details": self.details,
            "note": self.note,
        }


def rounds_note(done: int, wanted: int) -> str | None:
    """What a figure must say when some of its rounds failed (see the run's errors)."""
    return None if done >= wanted else f"{done} of {wanted} rounds (the others failed)"


def not_available(key: str, title: str, unit: str, reason: str, **kw: Any) -> Figure:
    return Figure(key, title, unit, None, note=f"n/a: {reason}", **kw)


def _rounded(value: float | None, digits: int = 2) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _row(figure: Figure) -> list[str]:
    peer = "—" if figure.peer_name is None else f"{_number(figure.peer)} ({figure.peer_name})"
    ratio = "—" if figure.ratio is None else f"{figure.ratio:.2f}×"
    target = "—" if figure.target is None else figure.target.describe(figure.unit)
    met = {True: "yes", False: "NO", None: "—" if figure.target is None else "n/a"}[figure.met]
    return [f"{figure.title} ({figure.unit})", _number(figure.sendkit), peer, ratio, target, met]


def table(figures: list[Figure]) -> str:
    header = ["figure", "SendKit", "peer", "ratio", "target", "met?"]
    rows = [header, *(_row(f) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.key}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Sorted keys and a trailing newline: diffs between runs show only what changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]
