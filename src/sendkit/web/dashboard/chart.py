"""A small line chart as data for an inline SVG (no charting library, no script)."""

from __future__ import annotations

from dataclasses import dataclass

from sendkit.message_log import DayUsage

SERIES = ("sent", "delivered", "deferred", "bounced")
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 44, 24, 14, 30


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    value: int
    label: str


@dataclass(frozen=True)
class Line:
    name: str
    points: list[Point]

    @property
    def path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]  # sent, per day
    lines: list[Line]  # delivered, deferred, bounced; drawn over the bars
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str, str]]  # x, label, text-anchor
    left: int
    right: int
    baseline: float


def nice_max(value: int) -> int:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above value (at least 4)."""
    if value <= 4:
        return 4
    magnitude = int(10 ** (len(str(value)) - 1))
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * magnitude)
        if top >= value:
            return top
    return 10 * magnitude


def build(days: list[DayUsage]) -> Chart:
    top = nice_max(max((int(getattr(d, s)) for d in days for s in SERIES), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(days) - 1)

    def x(i: int) -> float:
        return LEFT + i * step

    def y(v: int) -> float:
        return TOP + plot_h - (v / top) * plot_h

    width = step * 0.55
    bars = [
        Bar(x(i) - width / 2, y(d.sent), width, y(0) - y(d.sent), d.sent, d.day.strftime("%d %b"))
        for i, d in enumerate(days)
    ]
    lines = [
        Line(
            name,
            [
                Point(x(i), y(getattr(d, name)), getattr(d, name), d.day.strftime("%d %b"))
                for i, d in enumerate(days)
            ],
        )
        for name in ("bounced", "deferred", "delivered")  # the most common one on top
    ]
    y_ticks = [(y(int(top * f)), f"{int(top * f):,}") for f in (0, 0.25, 0.5, 0.75, 1)]
    last = len(days) - 1
    x_ticks = [
        (x(i), d.day.strftime("%d %b"), "start" if i == 0 else "end" if i == last else "middle")
        for i, d in enumerate(days)
        if (i % 5 == 0 and last - i >= 3) or i == last
    ]
    return Chart(WIDTH, HEIGHT, bars, lines, y_ticks, x_ticks, LEFT, WIDTH - RIGHT, TOP + plot_h)
