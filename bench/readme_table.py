"""Write the README's Performance table from bench/results/latest.json.

`make bench` runs it after a full run; by hand: `.venv/bin/python bench/readme_table.py`.
It replaces what stands between the two markers in README.md and nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
_OPS = {">=": "≥", "<=": "≤"}


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"


def _target(target: dict[str, Any] | None, unit: str) -> str:
    if not target:
        return "—"
    threshold = f"{target['threshold']:,g}"
    on = "× peer" if target["on"] == "ratio" else f" {unit}"
    return f"{_OPS.get(target['op'], target['op'])} {threshold}{on}"


def _row(figure: dict[str, Any]) -> str:
    unit = figure["unit"]
    value = "n/a" if figure["sendkit"] is None else f"{_number(figure['sendkit'])} {unit}"
    peer = "—"
    if figure.get("peer") is not None:
        peer = f"{_number(figure['peer'])} ({figure['peer_name']})"
    ratio = "—" if figure.get("ratio") is None else f"{figure['ratio']:.3g}×"
    met = {True: "yes", False: "**no**", None: "—"}[figure.get("met")]
    target = _target(figure["target"], unit)
    return f"| {figure['title']} | {value} | {peer} | {ratio} | {target} | {met} |"


def render(document: dict[str, Any]) -> str:
    machine = document["machine"]
    lines = [
        START,
        f"Latest full run: {machine['date']}, {machine['nproc']} cores "
        f"({machine['cpu_model']}), {machine['memory_mib']:,} MiB, Linux {machine['kernel']}, "
        f"Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"PostgreSQL {machine['postgresql_server']}, Postfix {machine['postfix']}, "
        f"wrk {machine['wrk']}; {document['total_seconds']:.0f} s "
        "(from `bench/results/latest.json`).",
        "",
        "| figure | SendKit | peer | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(document["figures"][key]) for key in document["order"]]
    return "\n".join([*lines, END])


def main() -> int:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench/results/latest.json"
    document = json.loads(results.read_text())
    if document.get("mode") != "full":
        print(f"{results} is a {document.get('mode')} run: README left as it is")
        return 0
    readme = REPO / "README.md"
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, found, after = rest.partition(END)
    if not found:
        print(f"README.md has no {START} … {END} markers", file=sys.stderr)
        return 1
    readme.write_text(before + render(document) + after)
    print(f"README.md: Performance table from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
