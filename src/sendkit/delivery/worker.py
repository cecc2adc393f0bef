"""Delivery workers: claim -> named steps -> record, with graceful shutdown.

Processing one message reads as a list of steps, each able to stop early:
check suppression -> build -> sign -> send -> decide -> (record, in batches) -> log event.
Outcomes are committed in small groups by one recorder task; a message is acknowledged
to nobody before its outcome is committed, and a crash before that commit only means the
lease runs out and the message is tried again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import random
import time
from dataclasses import dataclass
from enum import Enum

from sqlalchemy.exc import InterfaceError, OperationalError

from sendkit import dkim, domains, logs, mime, signing, suppressions, unsubscribe
from sendkit.addresses import normalise_domain
from sendkit.config import Settings
from sendkit.contacts import Status
from sendkit.db import Database, now_ms
from sendkit.delivery import queue
from sendkit.delivery.queue import Claimed, Outcome
from sendkit.delivery.retry import DEFAULT_SMTP_POLICY, RetryPolicy, next_attempt_at
from sendkit.delivery.sandbox import SandboxTransport
from sendkit.delivery.transports import (
    DeliveryResult,
    DirectTransport,
    Envelope,
    RelayTransport,
    SmtpTimeouts,
    Transport,
)
from sendkit.delivery.transports import Outcome as Kind
from sendkit.errors import ServiceUnavailable
from sendkit.services import Services

log = logs.get("sendkit.worker")

_KEY_CACHE_SECONDS = 60.0
# The longest a claim waits (seconds) while an API process is saturated: under an endless
# burst, delivery still claims a batch this often.
CLAIM_YIELD = 0.5
_RECORD_BATCH = 500
# A record transaction cost the delivery process about a millisecond of CPU whatever its
# size (BEGIN IMMEDIATE, four statements, the fsync, the writer thread and the loop
# taking turns with the GIL), and at 2,300 messages a second it recorded 5-10 outcomes
# each: outcomes now wait up to this long for half a batch of slots to finish
# (bench/README.md, sixth round: -45 µs of delivery CPU a message, +8 % end to end).
_RECORD_LINGER = 0.01  # seconds


def make_transport(settings: Settings, db: Database) -> Transport:
    timeouts = (
        SmtpTimeouts.uniform(settings.smtp_timeout) if settings.smtp_timeout else SmtpTimeouts()
    )
    if settings.delivery == "relay":
        return RelayTransport(
            settings.relay_host,
            settings.relay_port,
            username=settings.relay_username,
            password=settings.relay_password,
            tls=settings.relay_tls,
            ehlo_name=settings.ehlo_name,
            max_connections=settings.max_connections_per_destination,
            timeouts=timeouts,
        )
    if settings.delivery == "direct":
        return DirectTransport(
            ehlo_name=settings.ehlo_name,
            max_connections_per_destination=settings.max_connections_per_destination,
            timeouts=timeouts,
            port=settings.direct_port,
        )
    return SandboxTransport(db)


def retry_policy(settings: Settings) -> RetryPolicy:
    return (
        RetryPolicy.parse(settings.retry_schedule)
        if settings.retry_schedule
        else (DEFAULT_SMTP_POLICY)
    )


class _Unknown(Enum):
    """Not looked up at claim time: `deliver` looks it up itself."""

    LOOK_UP = "look up"


LOOK_UP = _Unknown.LOOK_UP


@dataclass(frozen=True)
class _Ready:
    """A claimed message waiting for a slot, with what the claim's lookups found."""

    message: Claimed
    suppressed: bool | None
    listing: unsubscribe.Membership | _Unknown | None
    start_by: float  # time.monotonic(): past it, leave the message to a reclaim


class Worker:
    """Claims due messages in batches, runs the steps of `deliver` for each in its own
    task, and hands the outcomes to one recorder task that commits them in batches.

    A slot (`concurrency`) is taken for the steps only: once the SMTP transaction is over
    the outcome goes to the recorder and the slot takes the next message, while the lease
    keeps protecting the message until its outcome commits (a crash before that commit
    means the lease runs out and the message is tried again). Up to `concurrency` more
    messages are claimed ahead (given back on stop), so a slot never waits for a claim's
    commit; and at most 2 × `concurrency` messages are ever in flight or waiting for their
    outcome's commit, which bounds what a crash can duplicate.
    """

    def __init__(
        self,
        services: Services,
        transport: Transport,
        *,
        concurrency: int | None = None,
        rng: random.Random | None = None,
        signer: signing.Signer | None = None,
    ) -> None:
        settings = services.settings
        self.services = services
        self.transport = transport
        # Signing processes are started and closed by `start_workers`; a worker built
        # without a signer signs in this process's threads.
        self.signer: signing.Signer = signer or signing.ThreadSigner()
        self.policy = retry_policy(settings)
        self.concurrency = concurrency or settings.worker_concurrency
        self.prefetch = self.concurrency
        self.max_unsettled = 2 * self.concurrency
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.wakeup = asyncio.Event()
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()
        self._ready: collections.deque[_Ready] = collections.deque()
        self._progress = asyncio.Event()  # a slot freed, or outcomes committed
        self._stopping = False
        self._outcomes: list[Outcome] = []  # waiting for the recorder
        self._outcome_ready = asyncio.Event()
        self._unrecorded = 0  # handed to the recorder, not committed yet
        self._closing_at: float | None = None  # set when the recorder should finish
        self._keys: dict[tuple[str, str], tuple[dkim.DkimKey | None, float]] = {}

    # --- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        recorder = asyncio.create_task(self._record_loop())
        watcher = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                await self._fill(stop)
        finally:
            watcher.cancel()
            await self._drain()
            self._closing_at = time.monotonic()
            self._outcome_ready.set()
            await asyncio.gather(recorder, watcher, return_exceptions=True)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._progress.set()

    def _room(self) -> int:
        """How many more messages to claim: free slots plus the claim-ahead buffer."""
        return self.concurrency + self.prefetch - len(self._inflight) - len(self._ready)

    async def _fill(self, stop: asyncio.Event) -> None:
        room = self._room()
        # Claim in batches: waiting for a quarter of the slots costs little latency and
        # saves a claim transaction per message. Outcomes piling up uncommitted (a slow
        # database) also pause the claims.
        busy = bool(self._inflight or self._ready or self._unrecorded)
        if busy and (
            room < max(1, self.concurrency // 4) or self._unrecorded >= self.max_unsettled
        ):
            self._progress.clear()
            await self._progress.wait()
            return
        # A saturated API goes first: what it accepts meanwhile waits in the queue.
        await self.services.db.yield_to_api(CLAIM_YIELD, stop)
        if stop.is_set():
            return
        # Cleared before the claim: a message queued while it runs still wakes the sleep.
        self.wakeup.clear()
        try:
            claimed = await queue.claim(self.services.db, room, self.lease_ms)
        except Exception:
            log.exception("claim_failed")
            claimed = []
        if claimed:
            self._ready.extend(await self._look_up(claimed))
            self._start_ready()
        else:
            await self._sleep(stop)

    async def _look_up(self, claimed: list[Claimed]) -> list[_Ready]:
        """The suppression list and the app contacts for a whole claim, in two queries."""
        start_by = time.monotonic() + self.lease_ms / 2000
        try:
            async with self.services.db.read() as conn:
                pairs = [(m.account_id, m.to_addr) for m in claimed]
                suppressed = await suppressions.suppressed_among(conn, pairs)
                listed = [(m.app_pk, m.to_addr) for m in claimed if m.app_pk is not None]
                contacts = await unsubscribe.memberships(conn, listed)
        except Exception:
            log.exception("claim_lookup_failed")  # each message looks itself up
            return [_Ready(m, None, LOOK_UP, start_by) for m in claimed]
        ready = []
        for m in claimed:
            to_addr = m.to_addr.lower()
            listing = None if m.app_pk is None else contacts.get((m.app_pk, to_addr))
            ready.append(_Ready(m, (m.account_id, to_addr) in suppressed, listing, start_by))
        return ready

    def _start_ready(self) -> None:
        """Start claimed messages while there are free slots (also called whenever a
        slot frees, so a slot never waits for the claim loop)."""
        while (
            self._ready
            and not self._stopping
            and len(self._inflight) < self.concurrency
            and len(self._inflight) + self._unrecorded < self.max_unsettled
        ):
            item = self._ready.popleft()
            if time.monotonic() > item.start_by:
                # Held too long (a stalled loop): another worker may reclaim it soon;
                # the lease runs out and the message is tried again.
                log.warning("claim_expired_unstarted", message_id=item.message.id)
                continue
            task = asyncio.create_task(self._process(item.message, item.suppressed, item.listing))
            self._inflight.add(task)
            task.add_done_callback(self._slot_freed)

    def _slot_freed(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._start_ready()
        self._progress.set()

    async def _sleep(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self.wakeup.wait())]
        await asyncio.wait(
            waiters, timeout=self.services.settings.poll_interval, return_when="FIRST_COMPLETED"
        )
        for waiter in waiters:
            waiter.cancel()

    async def _drain(self) -> None:
        """Let in-flight transactions finish, within the bound; the rest go back."""
        self._stopping = True
        unstarted = [item.message for item in self._ready]
        self._ready.clear()
        if unstarted:
            try:
                await queue.release(self.services.db, unstarted)
            except Exception:
                log.exception("release_failed", messages=len(unstarted))
        if self._inflight:
            _, late = await asyncio.wait(
                set(self._inflight), timeout=self.services.settings.shutdown_timeout
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # --- one message ------------------------------------------------------------------

    async def _process(
        self,
        message: Claimed,
        suppressed: bool | None = None,
        listing: unsubscribe.Membership | _Unknown | None = LOOK_UP,
    ) -> None:
        try:
            outcome = await self.deliver(message, suppressed, listing)
        except asyncio.CancelledError:
            await queue.release(self.services.db, [message])
            raise
        except Exception:
            log.exception("delivery_step_failed", message_id=message.id)
            return  # the lease runs out and the message is tried again
        self.observe(message, outcome)
        # The slot is free from here on; the lease protects the message until the
        # recorder commits its outcome.
        self._outcomes.append(outcome)
        self._unrecorded += 1
        self._outcome_ready.set()

    async def deliver(
        self,
        message: Claimed,
        suppressed: bool | None = None,
        listing: unsubscribe.Membership | _Unknown | None = LOOK_UP,
    ) -> Outcome:
        """`suppressed` and `listing` come from the batch lookups at claim time; None and
        LOOK_UP: look them up here."""
        started = now_ms()
        if suppressed is None:
            suppressed = await self.check_suppression(message)
        if suppressed:
            return _no_attempt(message, "suppressed", "recipient is on the suppression list")
        if listing is LOOK_UP:
            listing = await self.list_membership(message)
        if listing is not None and listing.status == Status.UNSUBSCRIBED.value:
            return _no_attempt(message, "suppressed", "recipient unsubscribed from this list")
        try:
            data = self.build(message, self.list_headers(message, listing))
        except ValueError as exc:
            return _no_attempt(message, "failed", f"message could not be built: {exc}")
        signed = await self.sign(message, data)
        result = await self.send(message, signed)
        outcome = self.decide(message, result, started)
        self.log_event(message, outcome, result)
        return outcome

    async def check_suppression(self, message: Claimed) -> bool:
        async with self.services.db.read() as conn:
            return await suppressions.is_suppressed(conn, message.account_id, message.to_addr)

    async def list_membership(self, message: Claimed) -> unsubscribe.Membership | None:
        """The recipient's contact when the message belongs to an app (sent with appId)."""
        if message.app_pk is None:
            return None
        return await unsubscribe.membership(self.services.db, message.app_pk, message.to_addr)

    def list_headers(
        self, message: Claimed, listing: unsubscribe.Membership | None
    ) -> tuple[tuple[str, str], ...]:
        """List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) for a contact of an app."""
        if listing is None or message.app_pk is None:
            return ()
        return unsubscribe.headers(
            self.services.settings,
            self.services.box,
            account_id=message.account_id,
            app_pk=message.app_pk,
            contact_id=listing.contact_id,
            from_domain=_domain_of(message.from_addr),
        )

    def build(self, message: Claimed, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        return mime.build(
            mime.OutgoingMessage(
                message_id=message.id,
                from_header=message.from_header,
                to_header=message.to_header,
                subject=message.subject,
                body=message.body,
                created_at=dt.datetime.fromtimestamp(message.created_at / 1000, dt.UTC),
                extra_headers=extra_headers,
            )
        )

    async def sign(self, message: Claimed, data: bytes) -> bytes:
        key = await self._signing_key(message.account_id, _domain_of(message.from_addr))
        if key is None:
            return data
        # Where the signer signs: by default a process beside this one, off the event
        # loop and its GIL (`signing`).
        header = await self.signer.sign(data, key, int(time.time()))
        return header + data

    async def send(self, message: Claimed, data: bytes) -> DeliveryResult:
        envelope = Envelope(
            mail_from=self.return_path(message),
            rcpt_to=message.to_addr,
            data=data,
            message_id=message.id,
        )
        return await self.transport.send(envelope)

    def return_path(self, message: Claimed) -> str:
        """VERP: the bounce address names the message, so a bounce finds its way back."""
        sub = self.services.settings.return_path_subdomain
        return f"b+{message.id}@{sub}.{_domain_of(message.from_addr)}"

    def decide(self, message: Claimed, result: DeliveryResult, started: int) -> Outcome:
        status: str = result.outcome.value
        retry_at: int | None = None
        if result.outcome is Kind.DEFERRED:
            retry_at = self._next_attempt(message)
            status = "deferred" if retry_at is not None else "failed"
        return Outcome(
            message_id=message.id,
            lease_token=message.lease_token,
            status=status,
            next_attempt_at=retry_at,
            code=result.code,
            text=result.text,
            host=result.host,
            started_at=started,
            duration_ms=int(result.duration * 1000),
        )

    def _next_attempt(self, message: Claimed) -> int | None:
        first = dt.datetime.fromtimestamp(message.created_at / 1000, dt.UTC)
        now = dt.datetime.now(dt.UTC)
        when = next_attempt_at(self.policy, message.attempts + 1, first, now, self._rng)
        return None if when is None else int(when.timestamp() * 1000)

    def observe(self, message: Claimed, outcome: Outcome) -> None:
        """Metrics: outcomes, the time from acceptance to a final outcome, attempt time."""
        final = outcome.status != "deferred"
        latency = (now_ms() - message.created_at) / 1000 if final else None
        attempt = outcome.duration_ms / 1000 if outcome.attempted else None
        self.services.metrics.observe_delivery(outcome.status, latency_s=latency, attempt_s=attempt)

    def log_event(self, message: Claimed, outcome: Outcome, result: DeliveryResult) -> None:
        logs.info(
            log,
            "delivery",
            message_id=message.id,
            status=outcome.status,
            code=result.code,
            host=result.host,
            attempt=message.attempts + 1,
            duration_ms=outcome.duration_ms,
            possibly_duplicated=result.possibly_duplicated,
        )
        if result.possibly_duplicated:
            log.warning("possibly_duplicated", message_id=message.id, host=result.host)

    async def _signing_key(self, account_id: str, domain: str) -> dkim.DkimKey | None:
        cached = self._keys.get((account_id, domain))
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        services = self.services
        key = await domains.signing_key(services.db, services.box, account_id, domain)
        self._keys[(account_id, domain)] = (key, time.monotonic() + _KEY_CACHE_SECONDS)
        return key

    # --- recording --------------------------------------------------------------------

    async def _record_loop(self) -> None:
        """Commit outcomes in batches until the worker stops and every outcome is in."""
        while True:
            if not self._outcomes:
                if self._closing_at is not None:
                    return
                self._outcome_ready.clear()
                await self._outcome_ready.wait()
                continue
            if self._worth_waiting():
                await asyncio.sleep(_RECORD_LINGER)
            batch = self._outcomes[:_RECORD_BATCH]
            del self._outcomes[:_RECORD_BATCH]
            try:
                await self._commit(batch)
            finally:
                self._unrecorded -= len(batch)
                self._progress.set()
                self._start_ready()

    def _worth_waiting(self) -> bool:
        """Whether more outcomes are due soon enough to share the next record: a batch
        still below half the slots while messages are in flight, and no stop under way."""
        # A task whose outcome is here may still be listed until its done callback runs.
        return (
            self._closing_at is None
            and len(self._outcomes) < max(1, self.concurrency // 2)
            and any(not task.done() for task in self._inflight)
        )

    async def _commit(self, batch: list[Outcome]) -> None:
        while True:
            try:
                recorded = set(await queue.finish(self.services.db, batch))
                break
            except Exception as exc:
                if not _transient(exc):
                    await self._commit_apart(batch, exc)
                    return
                # Never drop an outcome: the database may be briefly locked or restarting.
                log.exception("record_failed", batch=len(batch))
                if self._gave_up(batch):
                    return
                await asyncio.sleep(1)
        for outcome in batch:
            if outcome.message_id not in recorded:
                log.warning("lease_lost", message_id=outcome.message_id)

    async def _commit_apart(self, batch: list[Outcome], exc: Exception) -> None:
        """One outcome the database refuses must not hold the others back (retrying the
        same batch forever would stop the worker): halve until it is alone, then record
        it without its reply text, or leave it to its lease."""
        if len(batch) > 1:
            half = len(batch) // 2
            await self._commit(batch[:half])
            await self._commit(batch[half:])
            return
        (outcome,) = batch
        if outcome.text:
            log.error(
                "outcome_unrecordable", message_id=outcome.message_id, error=type(exc).__name__
            )
            await self._commit([dataclasses.replace(outcome, text="(reply not recordable)")])
            return
        log.error("outcome_dropped", message_id=outcome.message_id, error=type(exc).__name__)

    def _gave_up(self, batch: list[Outcome]) -> bool:
        """Stopping, and the database stayed unavailable past the shutdown bound: the
        leases run out and these messages are tried again (at least once)."""
        closing = self._closing_at
        if closing is None:
            return False
        if time.monotonic() - closing < self.services.settings.shutdown_timeout:
            return False
        log.error("outcomes_not_recorded", messages=[o.message_id for o in batch])
        return True


def _transient(exc: BaseException) -> bool:
    """A database that is locked, full, restarting or unreachable: worth the same batch
    again. Anything else (a value it refuses) would fail again."""
    return isinstance(exc, ServiceUnavailable | OperationalError | InterfaceError | OSError)


def _domain_of(address: str) -> str:
    return normalise_domain(address.rpartition("@")[2])


def _no_attempt(message: Claimed, status: str, text: str) -> Outcome:
    return Outcome(
        message_id=message.id,
        lease_token=message.lease_token,
        status=status,
        next_attempt_at=None,
        code=None,
        text=text,
        host=None,
        started_at=now_ms(),
        duration_ms=0,
        attempted=False,
    )
