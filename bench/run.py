"""Every SendKit benchmark against its peer, one table, bench/results/latest.json.

    make bench              # full sizes (takes a while)
    make bench QUICK=1      # CI sizes

Options: --quick, --output PATH, --work-dir DIR (kept afterwards: logs, databases),
--profile DIR (py-spy on `sendkit serve` during the intake and end-to-end phases),
--only NAME,... (e2e, intake, contacts, dkim, memory), --param NAME=N (a size from
benchkit/context.py). See bench/README.md.

Order: the bare app starts while the memory benchmark's queue is filled (neither is
measured); then each measurement runs alone, one after the other: the end-to-end rounds
(Postfix, then SendKit on a fresh deployment, `rounds` times, on SQLite then on
PostgreSQL), the intake rounds (SendKit on a fresh deployment, then the bare app), the
contacts, the memory and DKIM benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from benchkit import contacts, dkim, e2e, intake, machine, memory, tools
from benchkit.context import BENCH, REPO, Context, Params
from benchkit.postfix_side import POSTFIX_SETTINGS, PostfixRun, run_postfix
from benchkit.report import Figure, not_available, table, write_json
from benchkit.sendkit_side import (
    Deployment,
    Server,
    launched_server,
    postgres_database,
    serve_processes,
)

BENCHES = ("e2e", "intake", "contacts", "dkim", "memory")
T = TypeVar("T")


class Run:
    """Collects figures and phase timings; a failing phase becomes n/a, the run goes on."""

    def __init__(self, ctx: Context, only: set[str]) -> None:
        self.ctx = ctx
        self.only = only
        self.figures: list[Figure] = []
        self.phases: dict[str, float] = {}
        self.errors: list[str] = []

    def wants(self, *names: str) -> bool:
        return any(name in self.only for name in names)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # Each phase starts with the disk written back: what earlier phases wrote (a
        # million queued messages, a million contacts; up to ~100 MB was still pending
        # here) must not be written while a measurement's fsyncs wait behind it.
        pending, seconds = tools.settle()
        settled = f" (wrote back {pending:.0f} MB in {seconds:.1f} s)" if pending >= 1 else ""
        print(f"--- {name}{settled}", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - started, 2)

    def attempt(self, name: str, action: Callable[[], T], *fallback: Figure) -> T | None:
        """`action()`; on an error, record it and add the `fallback` figures instead."""
        try:
            with self.phase(name):
                return action()
        except Exception as exc:
            traceback.print_exc()
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self.errors.append(f"{name}: {reason}")
            for figure in fallback:
                figure.note = f"n/a: {name} failed: {reason}"
            self.figures.extend(fallback)
            return None


@dataclasses.dataclass
class Stage:
    """What starts before the measurements (none of it is measured)."""

    bare: intake.BareApp | None = None
    memory: memory.Prepared | None = None


def _e2e_fallback(database: str) -> Figure:
    title = f"end to end, {'SQLite' if database == 'sqlite' else 'PostgreSQL'}"
    return not_available(f"e2e_{database}", title, "msg/s", "failed")


@contextlib.contextmanager
def _fresh_server(ctx: Context, database: str, name: str) -> Iterator[Server]:
    """`sendkit serve` as in production on a deployment of its own (a new PostgreSQL
    database, or a new data directory), answering and settled; stopped at the end."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if database == "postgresql" else None
        wanted = ctx.params.serve_processes_postgresql if url else ctx.params.serve_processes_sqlite
        deployment = Deployment(
            name,
            ctx.work / name,
            ctx.sink_port,
            url,
            processes=serve_processes(wanted),
            worker_processes=ctx.params.worker_processes,
        )
        yield stack.enter_context(launched_server(deployment, ctx.work)).wait_settled()


def _start(run: Run, stack: contextlib.ExitStack) -> Stage:
    ctx, stage = run.ctx, Stage()
    if run.wants("intake"):
        stage.bare = run.attempt(
            "start bare app",
            lambda: stack.enter_context(intake.bare_app(ctx)),
            *intake.unavailable(),
        )
    if run.wants("memory"):
        fallback = not_available("memory_peak_rss", "peak RSS", "MB", "failed")
        stage.memory = run.attempt(
            "memory enqueue", lambda: stack.enter_context(memory.prepared(ctx)), fallback
        )
    return stage


def _e2e_round(run: Run, database: str, index: int) -> e2e.Round | None:
    """Postfix, then SendKit on a fresh deployment."""
    ctx, label = run.ctx, f"{database} {index + 1}/{run.ctx.params.rounds}"
    postfix = _postfix(run, f"e2e postfix ({label})", ctx.work / f"postfix-{database}-{index}")
    if postfix is None:
        return None

    def sendkit() -> e2e.SendKitRun:
        with _fresh_server(ctx, database, f"e2e-{database}-{index}") as server:
            return e2e.run_sendkit(ctx, server)

    result = run.attempt(f"e2e sendkit ({label})", sendkit)
    return None if result is None else e2e.Round(result, postfix)


def _e2e_phase(run: Run, database: str) -> None:
    rounds = [_e2e_round(run, database, index) for index in range(run.ctx.params.rounds)]
    done = [round_ for round_ in rounds if round_ is not None]
    if done:
        run.figures.append(e2e.figure(done, database, run.ctx.params.rounds))
    else:
        figure = _e2e_fallback(database)
        figure.note = "n/a: every round failed (see errors)"
        run.figures.append(figure)


def _intake_phase(run: Run, bare: intake.BareApp) -> None:
    ctx, wanted = run.ctx, run.ctx.params.rounds
    rounds = []
    for index in range(wanted):

        def measure(name: str = f"intake-{index}") -> intake.Round:
            return intake.run_round(ctx, name, _fresh_server(ctx, "sqlite", name), bare)

        found = run.attempt(f"intake ({index + 1}/{wanted})", measure)
        rounds += [found] if found is not None else []
    if rounds:
        run.figures.extend(intake.figures(rounds, wanted))
    else:
        for figure in intake.unavailable():
            figure.note = "n/a: every round failed (see errors)"
            run.figures.append(figure)


def _contacts_phase(run: Run) -> None:
    def measure() -> list[Figure]:
        with _fresh_server(run.ctx, "sqlite", "contacts") as server:
            return contacts.run(run.ctx, server)

    found = run.attempt("contacts", measure, *contacts.unavailable("failed"))
    run.figures.extend(found or [])


def _dkim_phase(run: Run) -> None:
    fallback = not_available("dkim", "DKIM signing, one core", "sig/s", "failed")
    figure = run.attempt("dkim", lambda: dkim.run(run.ctx), fallback)
    run.figures.extend([figure] if figure else [])


def _memory_phase(run: Run, stack: contextlib.ExitStack, prep: memory.Prepared) -> None:
    """The memory server boots while DKIM runs (see memory.launched)."""
    fallback = not_available("memory_peak_rss", "peak RSS", "MB", "failed")
    serving = run.attempt(
        "start memory server", lambda: stack.enter_context(memory.launched(run.ctx, prep)), fallback
    )
    if run.wants("dkim"):
        _dkim_phase(run)
    if serving is not None:
        port, proc = serving
        figure = run.attempt("memory", lambda: memory.measure(run.ctx, prep, port, proc), fallback)
        run.figures.extend([figure] if figure else [])
        proc.stop()


def _postfix(run: Run, name: str, work: Path) -> PostfixRun | None:
    ctx = run.ctx
    work.mkdir(parents=True, exist_ok=True)
    return run.attempt(
        name,
        lambda: run_postfix(work, ctx.sink_port, ctx.params.e2e_messages, ctx.params.body_bytes),
    )


def _benchmarks(run: Run) -> None:
    with contextlib.ExitStack() as stack:
        stage = _start(run, stack)
        if run.wants("e2e"):
            _e2e_phase(run, "sqlite")
            _e2e_phase(run, "postgresql")
        if stage.bare is not None:
            _intake_phase(run, stage.bare)
            stage.bare.proc.stop()  # idle servers stay out of the next measurements
        if run.wants("contacts"):
            _contacts_phase(run)
        if stage.memory is not None:
            _memory_phase(run, stack, stage.memory)
        elif run.wants("dkim"):
            _dkim_phase(run)


def _install() -> None:
    tools.ensure_wrk()
    tools.ensure_postfix(REPO)  # smtp-sink: the relay target of every SendKit server


def _document(run: Run, facts: dict[str, Any], seconds: float) -> dict[str, Any]:
    params = dataclasses.asdict(run.ctx.params)
    return {
        "mode": "quick" if run.ctx.quick else "full",
        "machine": facts,
        "parameters": {**params, "postfix_settings": POSTFIX_SETTINGS, "wrk": "-t2 -c64"},
        "figures": {f.key: f.to_json() for f in run.figures},
        "order": [f.key for f in run.figures],
        "phases_seconds": run.phases,
        "errors": run.errors,
        "total_seconds": round(seconds, 1),
    }


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: bench/results/latest.json, or quick.json with --quick",
    )
    parser.add_argument("--work-dir", type=Path, help="work here and keep it afterwards")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy output directory")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=N",
        help="override a size, e.g. --param memory_messages=100000 (see benchkit/context.py)",
    )
    args = parser.parse_args()
    if args.output is None:
        # A quick run never replaces the full run's figures (the README's table).
        args.output = BENCH / "results" / ("quick.json" if args.quick else "latest.json")
    return args


def _params(args: argparse.Namespace) -> Params:
    params = Params.quick() if args.quick else Params.full()
    overrides = dict(item.split("=", 1) for item in args.param)
    return dataclasses.replace(params, **{k: int(v) for k, v in overrides.items()})


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: servers stop


@contextlib.contextmanager
def _work_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="sendkit-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    args = _parse_args()
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    _install()
    from sendkit.testing.postfix import PostfixSmtpSink

    with _work_dir(args.work_dir) as work, PostfixSmtpSink(backlog=1024) as sink:
        ctx = Context(args.quick, _params(args), work, sink.port, args.profile)
        run = Run(ctx, only)
        _benchmarks(run)
    facts = machine.facts()
    seconds = time.perf_counter() - started
    document = _document(run, facts, seconds)
    write_json(args.output, document)
    print()
    print(" ".join(f"{k}={v}" for k, v in facts.items()))
    print(table(run.figures))
    print(f"\n{document['mode']} run: {seconds:.1f} s; results in {args.output}")
    for error in run.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
