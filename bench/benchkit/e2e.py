"""Benchmark 1: N documented sends over HTTP until every one is `delivered`, against
Postfix taking the same N messages over SMTP until its queue is empty.

Both sides run `rounds` times, taking turns (Postfix, then SendKit on a fresh
deployment), and the figure is each side's median: this machine's speed drifts by a
third within minutes, and one pair taken at one moment said more about the moment than
about either side."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from benchkit import tools
from benchkit.context import SEND_LUA, Context
from benchkit.postfix_side import PostfixRun
from benchkit.profiling import profiled
from benchkit.report import Figure, Target, rounds_note
from benchkit.sendkit_side import Server

TARGET = Target("ratio", ">=", 2.0)
_ENOUGH = 0.98  # of the requested messages accepted: the sending is over


@dataclass
class SendKitRun:
    messages: int
    accepted: int
    delivered: int
    seconds: float
    intake_seconds: float | None
    wrk: tools.WrkResult

    @property
    def per_second(self) -> float:
        return self.delivered / self.seconds


@dataclass
class _Progress:
    counts: dict[str, int]
    seconds: float
    intake_seconds: float | None


def run_sendkit(ctx: Context, server: Server) -> SendKitRun:
    """On a fresh deployment: the status counts are this run's messages."""
    total = ctx.params.e2e_messages
    with profiled(ctx.profile_dir, server.proc.pid, server.deployment.name):
        started = time.perf_counter()
        # The lua script stops each thread after its share; -d is only an upper bound.
        wrk = tools.BackgroundWrk(
            f"{server.base_url}/v1/send",
            SEND_LUA,
            seconds=120 + total / 10,
            env=ctx.wrk_env(server.demo.api_key, total),
            output=ctx.work / f"wrk-{server.deployment.name}.txt",
        )
        try:
            progress = _wait_until_delivered(server, total, started, timeout=120 + total / 10)
        finally:
            report = wrk.finish()
    counts = progress.counts
    return SendKitRun(
        total,
        sum(counts.values()),
        counts.get("delivered", 0),
        progress.seconds,
        progress.intake_seconds,
        report,
    )


def _wait_until_delivered(server: Server, total: int, started: float, timeout: float) -> _Progress:
    """Poll the progress until (about) `total` messages are in and none is left to
    deliver for a second; the end is when the last one was delivered. wrk's lua stop is
    not exact: a thread may send a request or two more or fewer than its share. The
    whole table is counted once, at the end (`Admin.progress` is what the polls cost)."""
    done_since: float | None = None
    intake: float | None = None
    account = server.demo.account_id
    while True:
        accepted, pending = server.admin.progress(account)
        now = time.perf_counter()
        if intake is None and accepted >= total:
            intake = now - started
        if pending or accepted < total * _ENOUGH:
            done_since = None
        elif done_since is None:
            done_since = now
        elif now - done_since >= 1.0:
            return _Progress(server.admin.counts(), done_since - started, intake)
        if now - started > timeout:
            raise TimeoutError(f"not delivered after {timeout:.0f} s: {server.admin.counts()}")
        time.sleep(0.1)


@dataclass
class Round:
    """One turn of each side, one after the other."""

    sendkit: SendKitRun
    postfix: PostfixRun


def figure(rounds: list[Round], database: str, wanted: int) -> Figure:
    """Each side's median over the rounds, and the median of the rounds' ratios (the
    target's); every round's figures in the details."""
    notes = [note] if (note := rounds_note(len(rounds), wanted)) else []
    for index, round_ in enumerate(rounds, 1):
        run = round_.sendkit
        if run.delivered < run.accepted or run.accepted < run.messages * _ENOUGH:
            notes.append(
                f"round {index}: {run.accepted} accepted, {run.delivered} delivered "
                f"of {run.messages}"
            )
        if tools.problems(run.wrk):
            notes.append(f"round {index}: {tools.problems(run.wrk)}")
    return Figure(
        key=f"e2e_{database}",
        title=f"end to end, {'SQLite' if database == 'sqlite' else 'PostgreSQL'}",
        unit="msg/s",
        sendkit=statistics.median(r.sendkit.per_second for r in rounds),
        peer=statistics.median(r.postfix.per_second for r in rounds),
        peer_name="Postfix",
        target=TARGET,
        paired_ratio=statistics.median(r.sendkit.per_second / r.postfix.per_second for r in rounds),
        details={
            "messages": rounds[0].sendkit.messages,
            "rounds": [_round_details(r) for r in rounds],
        },
        note="; ".join(notes) or None,
    )


def _round_details(round_: Round) -> dict[str, object]:
    run, peer = round_.sendkit, round_.postfix
    return {
        "sendkit_per_s": round(run.per_second, 1),
        "postfix_per_s": round(peer.per_second, 1),
        "ratio": round(run.per_second / peer.per_second, 3) if peer.per_second else None,
        "accepted": run.accepted,
        "delivered": run.delivered,
        "seconds": round(run.seconds, 3),
        "intake_seconds": None if run.intake_seconds is None else round(run.intake_seconds, 3),
        "postfix_seconds": round(peer.seconds, 3),
        "postfix_delivered": peer.delivered,
    }
