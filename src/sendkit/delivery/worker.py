"""Delivery workers: claim -> named steps -> record, with graceful shutdown.

Processing one message reads as a list of steps, each able to stop early:
check suppression -> build -> sign -> send -> decide -> (record, in batches) -> log event.
Outcomes are committed in small groups by one recorder task; a message is acknowledged
to nobody before its outcome is committed, and a crash before that commit only means the
lease runs out and the message is tried again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from dataclasses import dataclass

from sendkit import dkim, domains, logs, mime, suppressions, unsubscribe
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
from sendkit.services import Services

log = logs.get("sendkit.worker")

_KEY_CACHE_SECONDS = 60.0
_RECORD_BATCH = 500


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


@dataclass
class _Pending:
    outcome: Outcome
    done: asyncio.Future[None]


class Worker:
    def __init__(
        self,
        services: Services,
        transport: Transport,
        *,
        concurrency: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        settings = services.settings
        self.services = services
        self.transport = transport
        self.policy = retry_policy(settings)
        self.concurrency = concurrency or settings.worker_concurrency
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.wakeup = asyncio.Event()
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()
        self._pending: asyncio.Queue[_Pending] = asyncio.Queue()
        self._keys: dict[tuple[str, str], tuple[dkim.DkimKey | None, float]] = {}

    # --- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        recorder = asyncio.create_task(self._record_loop())
        try:
            while not stop.is_set():
                await self._fill(stop)
        finally:
            await self._drain()
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)

    async def _fill(self, stop: asyncio.Event) -> None:
        capacity = self.concurrency - len(self._inflight)
        # Claim in batches: waiting for a quarter of the slots costs little latency and
        # saves a claim transaction per message.
        if self._inflight and capacity < max(1, self.concurrency // 4):
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return
        try:
            claimed = await queue.claim(self.services.db, capacity, self.lease_ms)
            suppressed = await self._suppressed(claimed)
        except Exception:
            log.exception("claim_failed")
            claimed, suppressed = [], set()
        for message in claimed:
            flagged = (message.account_id, message.to_addr.lower()) in suppressed
            task = asyncio.create_task(self._process(message, flagged))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if not claimed:
            await self._sleep(stop)

    async def _sleep(self, stop: asyncio.Event) -> None:
        self.wakeup.clear()
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self.wakeup.wait())]
        await asyncio.wait(
            waiters, timeout=self.services.settings.poll_interval, return_when="FIRST_COMPLETED"
        )
        for waiter in waiters:
            waiter.cancel()

    async def _drain(self) -> None:
        """Let in-flight transactions finish, within the bound; the rest go back."""
        if self._inflight:
            _, late = await asyncio.wait(
                self._inflight, timeout=self.services.settings.shutdown_timeout
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._flush()

    # --- one message ------------------------------------------------------------------

    async def _suppressed(self, claimed: list[Claimed]) -> set[tuple[str, str]]:
        if not claimed:
            return set()
        async with self.services.db.read() as conn:
            pairs = [(m.account_id, m.to_addr) for m in claimed]
            return await suppressions.suppressed_among(conn, pairs)

    async def _process(self, message: Claimed, suppressed: bool | None = None) -> None:
        try:
            outcome = await self.deliver(message, suppressed)
        except asyncio.CancelledError:
            await queue.release(self.services.db, [message])
            raise
        except Exception:
            log.exception("delivery_step_failed", message_id=message.id)
            return  # the lease runs out and the message is tried again
        self.observe(message, outcome)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._pending.put(_Pending(outcome, done))
        await done

    async def deliver(self, message: Claimed, suppressed: bool | None = None) -> Outcome:
        """`suppressed` comes from the batch lookup at claim time; None: look it up."""
        started = now_ms()
        if suppressed is None:
            suppressed = await self.check_suppression(message)
        if suppressed:
            return _no_attempt(message, "suppressed", "recipient is on the suppression list")
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
        # OpenSSL releases the GIL while signing: a thread gives the second core work.
        header = await asyncio.to_thread(dkim.sign, data, key, int(time.time()))
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
        log.info(
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
        while True:
            batch = [await self._pending.get()]
            await self._commit(batch)

    async def _flush(self) -> None:
        while not self._pending.empty():
            await self._commit([])

    async def _commit(self, batch: list[_Pending]) -> None:
        while not self._pending.empty() and len(batch) < _RECORD_BATCH:
            batch.append(self._pending.get_nowait())
        if not batch:
            return
        while True:
            try:
                recorded = set(await queue.finish(self.services.db, [p.outcome for p in batch]))
                break
            except Exception:
                # Never drop an outcome: the database may be briefly locked or restarting.
                log.exception("record_failed", batch=len(batch))
                await asyncio.sleep(1)
        for pending in batch:
            if pending.outcome.message_id not in recorded:
                log.warning("lease_lost", message_id=pending.outcome.message_id)
            if not pending.done.done():
                pending.done.set_result(None)


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
