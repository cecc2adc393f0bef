"""The benchmark's rounds: a target is checked on the median of the rounds' own ratios,
each side's figure is its median, and a figure says when some rounds failed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from benchkit import e2e, intake, procs, tools
from benchkit.postfix_side import PostfixRun


def _wrk(per_second: float, p99: float = 10.0) -> tools.WrkResult:
    return tools.WrkResult(
        requests=int(per_second * 10),
        seconds=10.0,
        per_second=per_second,
        latency_ms={"50": p99 / 2, "99": p99},
    )


def _e2e_round(sendkit: float, postfix: float) -> e2e.Round:
    run = e2e.SendKitRun(20_000, 20_000, 20_000, 20_000 / sendkit, None, _wrk(1.0))
    return e2e.Round(run, PostfixRun(20_000, 20_000, 20_000 / postfix))


def test_e2e_target_is_the_median_of_the_rounds_ratios() -> None:
    # Ratios 2.0, 3.0, 1.5: median 2.0. One side's median over the other's would be
    # 1,800 / 1,000 = 1.8, pairing runs taken in different rounds.
    rounds = [_e2e_round(2_000, 1_000), _e2e_round(1_500, 500), _e2e_round(1_800, 1_200)]
    figure = e2e.figure(rounds, "sqlite", 3)
    assert figure.sendkit == pytest.approx(1_800)
    assert figure.peer == pytest.approx(1_000)
    assert figure.ratio == pytest.approx(2.0)
    assert figure.met is True
    assert [r["ratio"] for r in figure.details["rounds"]] == [2.0, 3.0, 1.5]
    assert figure.note is None


def test_e2e_figure_says_how_many_rounds_it_has() -> None:
    figure = e2e.figure([_e2e_round(1_000, 1_000)], "postgresql", 3)
    assert figure.ratio == pytest.approx(1.0)
    assert figure.met is False
    assert figure.note == "1 of 3 rounds (the others failed)"


def test_intake_medians_per_side_and_of_the_ratios() -> None:
    rounds = [
        (_wrk(6_000, p99=20.0), _wrk(12_000, p99=10.0)),  # 0.50
        (_wrk(8_000, p99=300.0), _wrk(10_000, p99=12.0)),  # 0.80
        (_wrk(7_000, p99=18.0), _wrk(14_000, p99=11.0)),  # 0.50
    ]
    rate, p50, p99 = intake.figures(rounds, 3)
    assert rate.sendkit == pytest.approx(7_000)
    assert rate.peer == pytest.approx(12_000)
    assert rate.ratio == pytest.approx(0.5)
    assert rate.met is True
    # One round's 300 ms tail does not make the figure; it stays in the details.
    assert p99.sendkit == pytest.approx(20.0)
    assert p99.met is True
    assert p50.sendkit == pytest.approx(10.0)
    assert rate.details["rounds"][1]["sendkit"]["latency_ms"]["99"] == 300.0


def test_wait_settled_waits_for_a_busy_child() -> None:
    # A parent whose child burns CPU for a second, then both idle.
    child = "import time; end = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {child!r}]);"
            " time.sleep(30)",
        ]
    )
    try:
        time.sleep(0.2)
        started = time.monotonic()
        procs.wait_settled(parent.pid, timeout=20)
        assert time.monotonic() - started >= 0.7
    finally:
        parent.kill()
        parent.wait()


def test_wait_settled_gives_up_on_a_process_that_stays_busy() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with pytest.raises(TimeoutError):
            procs.wait_settled(busy.pid, timeout=1.5)
    finally:
        busy.kill()
        busy.wait()
