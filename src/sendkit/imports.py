"""Contacts in and out as CSV: imports run as background jobs, exports stream.

An import never holds the request that uploaded it: the file is kept in the data directory,
a row in `import_jobs` records the progress, and a task works through the file in batches
of `BATCH` rows, `GROUP` batches per transaction, reading the next ones in a thread while
the database writes. Every row goes through the API's own rules
(`contacts.SaveContact`): an unknown address is created with the row's status (default
Confirmed); a known one merges the row's non-empty fields, as `POST /v1/contact` merges
`data` (status counts on create only). Empty cells never erase what is stored.

Columns are the API's names (`emailAddress`, `status`, `firstName`, ...), in any order and
case; `email` is accepted for `emailAddress`. An export writes exactly those columns, so
an exported file imports back unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from sendkit import apps, csvcells, framing, logs
from sendkit.contacts import _EMPTY, DATA_FIELDS, SaveContact, Status, _data_values
from sendkit.db import Database, contacts, import_jobs, now_ms
from sendkit.db import apps as apps_table
from sendkit.errors import BadRequest, NotFound
from sendkit.validation import describe

log = logs.get("sendkit.imports")

BATCH = 1000
GROUP = 5  # batches per transaction
_ANALYZE_AFTER = 10_000  # contacts created by one import
EXPORT_COLUMNS = ["emailAddress", "status", *DATA_FIELDS]
_KEPT_ERRORS = 20
_STALE_MS = 120_000  # a running job that has not moved for this long was interrupted
_ALIASES = {
    "email": "emailAddress",
    "e-mail": "emailAddress",
    "emailaddress": "emailAddress",
    "email_address": "emailAddress",
    "phone": "phoneNumber",
    "first_name": "firstName",
    "last_name": "lastName",
    "phone_number": "phoneNumber",
    "vip_level": "vipLevel",
} | {name.lower(): name for name in EXPORT_COLUMNS}


@dataclass(frozen=True)
class Job:
    id: str
    app_pk: str
    status: str  # queued | running | done | failed
    filename: str
    total_rows: int
    processed_rows: int
    created_rows: int
    updated_rows: int
    error_rows: int
    errors: list[str]
    created_at: int
    updated_at: int

    @property
    def percent(self) -> int:
        if self.status == "done":
            return 100
        if self.total_rows <= 0:
            return 0
        return min(100, self.processed_rows * 100 // self.total_rows)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(
            id=row.id,
            app_pk=row.app_pk,
            status=row.status,
            filename=row.filename,
            total_rows=row.total_rows,
            processed_rows=row.processed_rows,
            created_rows=row.created_rows,
            updated_rows=row.updated_rows,
            error_rows=row.error_rows,
            errors=[e for e in row.errors.split("\n") if e],
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


def upload_path(data_dir: Path) -> Path:
    """A new private file for an uploaded CSV, inside the data directory."""
    folder = data_dir / "imports"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"{secrets.token_hex(16)}.csv"


async def create_job(db: Database, account_id: str, app_id: str, filename: str, path: Path) -> Job:
    now = now_ms()
    job_id = secrets.token_hex(16)
    async with db.begin() as conn:
        app = await apps.resolve(conn, account_id, app_id)
        await conn.execute(
            import_jobs.insert().values(
                id=job_id,
                account_id=account_id,
                app_pk=app.pk,
                status="queued",
                filename=filename[:300],
                path=str(path),
                total_rows=0,
                processed_rows=0,
                created_rows=0,
                updated_rows=0,
                error_rows=0,
                errors="",
                created_at=now,
                updated_at=now,
            )
        )
    return await get_job(db, account_id, job_id)


async def get_job(db: Database, account_id: str, job_id: str) -> Job:
    """One of the account's jobs; another account's id answers NotFound."""
    await _expire_stale(db)
    async with db.read() as conn:
        row = (
            await conn.execute(
                import_jobs.select().where(
                    import_jobs.c.id == job_id, import_jobs.c.account_id == account_id
                )
            )
        ).first()
    if row is None:
        raise NotFound("Import not found")
    return Job.from_row(row)


async def list_jobs(db: Database, account_id: str, app_id: str, limit: int = 10) -> list[Job]:
    await _expire_stale(db)
    async with db.read() as conn:
        app = await apps.resolve(conn, account_id, app_id)
        rows = await conn.execute(
            import_jobs.select()
            .where(import_jobs.c.account_id == account_id, import_jobs.c.app_pk == app.pk)
            .order_by(import_jobs.c.created_at.desc())
            .limit(limit)
        )
        return [Job.from_row(r) for r in rows]


async def _expire_stale(db: Database) -> None:
    """A job whose process stopped (restart, crash) would show 'running' forever.
    Looked for with a read first: pages that poll a job must not take the write lock."""
    stale = (
        import_jobs.c.status.in_(("queued", "running")),
        import_jobs.c.updated_at < now_ms() - _STALE_MS,
    )
    async with db.read() as conn:
        found = await conn.scalar(sa.select(import_jobs.c.id).where(*stale).limit(1))
    if found is None:
        return
    async with db.begin() as conn:
        await conn.execute(
            import_jobs.update()
            .where(*stale)
            .values(status="failed", errors="The import was interrupted: upload the file again.")
        )


# --- reading the file -------------------------------------------------------------------


# A row read: (address, status, the columns to set: every one on create, the given ones on
# update). A plain tuple: a million of them are made, and a reading process pickles them.
_Row = tuple[str, str, dict[str, Any]]


class _Reader:
    """Batches of validated rows from a CSV file (blocking: run it in a thread)."""

    def __init__(self, stream: IO[str], app_id: str, default_status: Status) -> None:
        self.stream = stream
        sample = stream.readline()
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        stream.seek(0)
        self._reader = csv.reader(stream, delimiter=delimiter)
        self._columns = self._header(next(self._reader, []))
        self._app_id = app_id
        self._default_status = default_status.value
        self._line = 1
        self.size = BATCH  # rows and errors per batch

    @classmethod
    def open(cls, path: Path, app_id: str, default_status: Status) -> _Reader:
        stream = path.open(newline="", encoding="utf-8-sig")
        try:
            return cls(stream, app_id, default_status)
        except BaseException:
            stream.close()
            raise

    @staticmethod
    def _header(names: list[str]) -> list[str | None]:
        columns = [_ALIASES.get(n.strip().lower().replace(" ", "")) for n in names]
        if "emailAddress" not in columns:
            raise BadRequest("The CSV file needs an 'emailAddress' (or 'email') column")
        return columns

    def batch(self) -> tuple[list[_Row], list[str]]:
        rows: list[_Row] = []
        errors: list[str] = []
        for cells in self._reader:
            self._line += 1
            if not "".join(cells).strip():
                continue
            try:
                rows.append(self._row(cells))
            except ValidationError as exc:
                errors.append(f"row {self._line}: {describe(exc).removeprefix('Bad request ')}")
            if len(rows) + len(errors) >= self.size:
                break
        return rows, errors

    def batches(self, count: int) -> tuple[list[tuple[list[_Row], list[str]]], Exception | None]:
        """Up to `count` batches, and the error that stopped the reading, if one did:
        the batches read before it are still written, as when each was read alone."""
        found: list[tuple[list[_Row], list[str]]] = []
        try:
            while len(found) < count:
                rows, errors = self.batch()
                if not rows and not errors:
                    break
                found.append((rows, errors))
        except Exception as exc:  # raised again by the writer, after these batches
            return found, exc
        return found, None

    def _row(self, cells: list[str]) -> _Row:
        given = {}
        for column, cell in zip(self._columns, cells, strict=False):
            value = cell.strip()
            if column and value:
                given[column] = csvcells.unescape(value)
        email = given.pop("emailAddress", "")
        status = given.pop("status", "").capitalize() or self._default_status
        request = SaveContact.model_validate(
            {"appId": self._app_id, "emailAddress": email, "status": status, "data": given}
        )
        return (request.emailAddress, request.status.value, _data_values(request.data))


def _count_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        return max(0, sum(1 for cells in csv.reader(stream) if cells) - 1)


# --- writing ----------------------------------------------------------------------------


@dataclass
class _Tally:
    processed: int = 0
    created: int = 0
    updated: int = 0
    failed: int = 0


def _merged(rows: list[_Row]) -> dict[str, _Row]:
    """A batch by lower-cased address: the same address twice, the later fields win."""
    merged: dict[str, _Row] = {}
    for row in rows:
        key = row[0].lower()
        earlier = merged.get(key)
        merged[key] = row if earlier is None else (earlier[0], earlier[1], earlier[2] | row[2])
    return merged


async def _write(
    conn: AsyncConnection, app_pk: str, batches: list[list[_Row]]
) -> list[tuple[int, int]]:
    """Write batches in one transaction, each as if alone; (created, updated) per batch.

    One `INSERT ... ON CONFLICT DO NOTHING RETURNING` for all the batches says which
    addresses were new without a look-up first (an `IN` list of a thousand addresses gets
    a sequential scan on PostgreSQL while the table's statistics are still those of an
    empty table). An address is inserted with the batch it first appears in; in a later
    batch it is known, so it is merged there and counted as an update, as it was when each
    batch was written alone."""
    now = now_ms()
    merged = [_merged(rows) for rows in batches]
    first: dict[str, int] = {}  # address -> the batch it first appears in
    new = []
    for index, batch in enumerate(merged):
        for key, row in batch.items():
            if key not in first:
                first[key] = index
                email, status, values = row
                new.append((email, key, status, *(_EMPTY | values).values()))
    created = set(await _insert_new(conn, app_pk, now, new))
    counts = []
    for index, batch in enumerate(merged):
        known = [(k, r) for k, r in batch.items() if k not in created or first[k] != index]
        await _merge_existing(conn, app_pk, known, now)
        counts.append((len(batch) - len(known), len(known)))
    await apps.contacts_changed(conn, app_pk, added=len(created))
    return counts


# The columns of a new contact: the address and status, then the data columns (in
# `_EMPTY`'s order), each row's; the app and the times are the same for the whole batch.
_NEW_COLUMNS = ("email", "email_lower", "status", *_EMPTY)
_INSERT_COLUMNS = ", ".join(("app_pk", *_NEW_COLUMNS, "created_at", "updated_at"))
_PG_TYPES = {"vip_level": "integer"}
_SQLITE_ROWS = 2000


@functools.cache
def _pg_insert() -> str:
    # One statement of fixed shape: an array per column, prepared once per connection.
    arrays = ", ".join(
        f"${i}::{_PG_TYPES.get(c, 'varchar')}[]" for i, c in enumerate(_NEW_COLUMNS, 4)
    )
    return (
        f"INSERT INTO contacts ({_INSERT_COLUMNS})"  # noqa: S608 (names are constants)
        f" SELECT $1, {', '.join(_NEW_COLUMNS)}, $2, $3"
        f" FROM unnest({arrays}) AS t({', '.join(_NEW_COLUMNS)})"
        " ON CONFLICT (app_pk, email_lower) DO NOTHING RETURNING email_lower"
    )


@functools.lru_cache(maxsize=4)
def _sqlite_insert(count: int) -> str:
    one = "(?, " + "?, " * len(_NEW_COLUMNS) + "?, ?)"
    return (
        f"INSERT INTO contacts ({_INSERT_COLUMNS}) VALUES "  # noqa: S608 (names are constants)
        + ", ".join([one] * count)
        + " ON CONFLICT (app_pk, email_lower) DO NOTHING RETURNING email_lower"
    )


async def _insert_new(
    conn: AsyncConnection, app_pk: str, now: int, rows: list[tuple[Any, ...]]
) -> list[str]:
    """Insert the rows whose address the app does not have yet; their addresses.

    Written for the driver, without SQLAlchemy's per-row parameter handling (a quarter of
    an import's time): PostgreSQL gets one array per column, SQLite multi-row VALUES of
    `_SQLITE_ROWS` rows (14 parameters each, below SQLite's default limit of 32,766)."""
    if not rows:
        return []
    if conn.dialect.name == "postgresql":
        columns = [list(c) for c in zip(*rows, strict=True)]
        result = await conn.exec_driver_sql(_pg_insert(), (app_pk, now, now, *columns))
        return list(result.scalars())
    created: list[str] = []
    for start in range(0, len(rows), _SQLITE_ROWS):
        part = rows[start : start + _SQLITE_ROWS]
        flat = tuple(v for row in part for v in (app_pk, *row, now, now))
        result = await conn.exec_driver_sql(_sqlite_insert(len(part)), flat)
        created.extend(result.scalars())
    return created


async def _merge_existing(
    conn: AsyncConnection, app_pk: str, rows: list[tuple[str, _Row]], now: int
) -> None:
    """Known addresses get their given fields; one statement per set of fields."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, row in rows:
        values = row[2]
        columns = tuple(sorted(values))
        params = {"k_app": app_pk, "k_email": key, "k_now": now}
        groups.setdefault(columns, []).append(params | {f"v_{c}": values[c] for c in columns})
    for columns, batch in groups.items():
        statement = (
            contacts.update()
            .where(
                contacts.c.app_pk == sa.bindparam("k_app"),
                contacts.c.email_lower == sa.bindparam("k_email"),
            )
            .values(
                updated_at=sa.bindparam("k_now"), **{c: sa.bindparam(f"v_{c}") for c in columns}
            )
        )
        await conn.execute(statement, batch)


async def _commit_batches(
    db: Database, job: Job, batches: list[tuple[list[_Row], list[str]]], tally: _Tally
) -> None:
    """Several batches in one transaction, each written as if alone (the counts and the
    merging of repeated addresses are per batch, so they do not depend on `GROUP`)."""
    async with db.begin() as conn:
        counts = await _write(conn, job.app_pk, [rows for rows, _ in batches])
        await _progress(
            conn,
            job.id,
            tally,
            sum(len(rows) for rows, _ in batches),
            [error for _, errors in batches for error in errors],
            sum(created for created, _ in counts),
            sum(updated for _, updated in counts),
        )


async def _progress(
    conn: AsyncConnection,
    job_id: str,
    tally: _Tally,
    rows: int,
    errors: list[str],
    created: int,
    updated: int,
) -> None:
    tally.processed += rows + len(errors)
    tally.created += created
    tally.updated += updated
    kept = await conn.scalar(sa.select(import_jobs.c.errors).where(import_jobs.c.id == job_id))
    lines = [e for e in (kept or "").split("\n") if e]
    lines += errors[: max(0, _KEPT_ERRORS - len(lines))]
    tally.failed += len(errors)
    await conn.execute(
        import_jobs.update()
        .where(import_jobs.c.id == job_id)
        .values(
            processed_rows=tally.processed,
            created_rows=tally.created,
            updated_rows=tally.updated,
            error_rows=tally.failed,
            errors="\n".join(lines),
            updated_at=now_ms(),
        )
    )


async def _set(db: Database, job_id: str, **values: Any) -> None:
    async with db.begin() as conn:
        await conn.execute(
            import_jobs.update()
            .where(import_jobs.c.id == job_id)
            .values(updated_at=now_ms(), **values)
        )


async def run_job(db: Database, job_id: str, default_status: Status = Status.CONFIRMED) -> Job:
    """Work through a queued job's file to the end; the file is removed afterwards."""
    async with db.read() as conn:
        row = (await conn.execute(import_jobs.select().where(import_jobs.c.id == job_id))).first()
        if row is None:
            raise NotFound("Import not found")
        app_id = await conn.scalar(
            sa.select(apps_table.c.app_id).where(apps_table.c.id == row.app_pk)
        )
    job, path = Job.from_row(row), Path(row.path)
    try:
        total = await asyncio.to_thread(_count_rows, path)
        await _set(db, job_id, status="running", total_rows=total)
        created = await _import(db, job, path, str(app_id), default_status, total)
        await _refresh_statistics(db, created)
        await _set(db, job_id, status="done")
    except (BadRequest, UnicodeDecodeError, csv.Error, OSError) as exc:
        await _set(db, job_id, status="failed", errors=_failure(exc))
    except asyncio.CancelledError:
        await _set(
            db, job_id, status="failed", errors="The import was interrupted: upload the file again."
        )
        raise
    finally:
        await asyncio.to_thread(_remove, path)
    async with db.read() as conn:
        done = (await conn.execute(import_jobs.select().where(import_jobs.c.id == job_id))).first()
    return Job.from_row(done)


def _failure(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "The file is not UTF-8 text: save it as 'CSV UTF-8' and upload it again."
    if isinstance(exc, BadRequest):
        return exc.message
    return f"The file could not be read: {exc}"


async def _refresh_statistics(db: Database, created: int) -> None:
    """After a large import PostgreSQL still plans with the statistics of a far smaller
    table until autovacuum gets to it (never, when it is off): a few hundred contacts per
    app instead of a million, and bitmap scans that read a whole app to sort it."""
    if db.is_sqlite or created < _ANALYZE_AFTER:
        return
    try:
        async with db.begin() as conn:
            await conn.execute(sa.text("ANALYZE contacts"))
    except Exception:  # the contacts are in: a busy table only delays better plans
        log.warning("contacts_analyze_failed", exc_info=True)


async def _import(
    db: Database, job: Job, path: Path, app_id: str, default_status: Status, total: int
) -> int:
    """Write each group of `GROUP` batches while the next group is read and validated:
    the commit's disk flush and the database's own work then overlap the parsing."""
    tally = _Tally()
    if total >= _PROCESS_ROWS:
        source: _Source = await _ProcessSource.start(path, app_id, default_status)
    else:
        source = _ThreadSource(await asyncio.to_thread(_Reader.open, path, app_id, default_status))
    try:
        while True:
            batches, failure = await source.next()
            if batches:
                await _commit_batches(db, job, batches, tally)
            if failure is not None:
                raise failure
            if not batches:
                return tally.created
    finally:
        await source.close()


_Batches = tuple[list[tuple[list[_Row], list[str]]], Exception | None]  # _Reader.batches

# A file this long is read in a process of its own. Parsing holds the GIL: in a thread it
# took turns at it with the event loop and the database driver's thread, and read at half
# its speed alone (a 1,000,000-row import: 59 us a row in the thread, 30 alone;
# bench/README.md). Starting the process costs 1-1.5 s here (it imports the app's models):
# 20,000 rows took 0.85 s in the thread and 1.5-2.2 s with a process, 50,000 rows 2.84
# and 2.38 s, 100,000 rows 5.59 and 3.83 s.
_PROCESS_ROWS = 50_000
_READER_NICENESS = 5  # a background job: the API comes first when the cores are busy
_EXIT_SECONDS = 5.0


class _Source(Protocol):
    async def next(self) -> _Batches:
        """The next `GROUP` batches, as `_Reader.batches` gives them."""
        ...

    async def close(self) -> None: ...


class _ThreadSource:
    """A `_Reader` in a worker thread, one group read ahead."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self._ahead: asyncio.Future[_Batches] | None = None

    def _read(self) -> asyncio.Future[_Batches]:
        return asyncio.ensure_future(asyncio.to_thread(self._reader.batches, GROUP))

    async def next(self) -> _Batches:
        if self._ahead is None:
            self._ahead = self._read()
        # Shielded: a cancelled caller must not mark the read done while its thread reads.
        batches, failure = await asyncio.shield(self._ahead)
        self._ahead = self._read() if failure is None and batches else None
        return batches, failure

    async def close(self) -> None:
        # The thread cannot be interrupted: let it finish before its file is closed.
        if self._ahead is not None:
            await asyncio.gather(self._ahead, return_exceptions=True)
        self._reader.stream.close()


class _ProcessSource:
    """A `_Reader` in `sendkit.import_child`, which reads ahead until the pipe is full."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._finished = False  # its last frame came: it is on its way out

    @classmethod
    async def start(cls, path: Path, app_id: str, default_status: Status) -> _ProcessSource:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not the working directory's modules: only installed ones
            "-m",
            "sendkit.import_child",
            *(str(a) for a in (os.getpid(), _READER_NICENESS, path, BATCH, GROUP)),
            app_id,
            default_status.value,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def next(self) -> _Batches:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            found: _Batches = await framing.read_frame(stdout)
        except asyncio.IncompleteReadError:
            code = await self._process.wait()
            raise RuntimeError(f"the import's reading process ended early ({code})") from None
        self._finished = found[1] is not None or not found[0]
        return found

    async def close(self) -> None:
        # communicate(): read the pipe to its end, then wait. The process is not waited
        # for while unread frames fill the pipe (asyncio's own loop waits for both).
        if self._finished:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.communicate(), _EXIT_SECONDS)
        if self._process.returncode is None:  # stopped midway, or wedged
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.communicate()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class ImportRunner:
    """The import tasks of this process, so they can be awaited (tests) or stopped."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, job_id: str, default_status: Status = Status.CONFIRMED) -> None:
        task = asyncio.create_task(self._run(job_id, default_status), name=f"import-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str, default_status: Status) -> None:
        try:
            job = await run_job(self._db, job_id, default_status)
            log.info("import_finished", job_id=job_id, status=job.status, rows=job.processed_rows)
        except Exception:
            log.exception("import_failed", job_id=job_id)
            await _set(self._db, job_id, status="failed", errors="The import failed unexpectedly.")

    async def wait(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await self.wait()


# --- export -----------------------------------------------------------------------------


async def export_rows(db: Database, account_id: str, app_id: str) -> AsyncIterator[bytes]:
    """Resolve the app now (a wrong id fails before anything is sent), then stream the
    CSV in pages of `BATCH` contacts, each read in its own short transaction."""
    async with db.read() as conn:
        app = await apps.resolve(conn, account_id, app_id)
    return _export_pages(db, app.pk)


async def _export_pages(db: Database, app_pk: str) -> AsyncIterator[bytes]:
    yield _csv_line(EXPORT_COLUMNS)
    last_id = 0
    columns = [contacts.c[c] for c in ("email", "status", *DATA_FIELDS.values())]
    while True:
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(contacts.c.id, *columns)
                    .where(contacts.c.app_pk == app_pk, contacts.c.id > last_id)
                    .order_by(contacts.c.id)
                    .limit(BATCH)
                )
            ).all()
        if not rows:
            return
        last_id = rows[-1].id
        yield b"".join(_csv_line(list(r)[1:]) for r in rows)


def _csv_line(values: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([csvcells.escape(v) for v in values])
    return out.getvalue().encode("utf-8")
