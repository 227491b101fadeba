"""One app in one APNs environment: its connection pool, its provider token, retries.

`ApnsSender.send` queues notifications (waiting while ``max_queue`` are queued or in flight:
backpressure) and returns their results once APNs has answered each. A dispatcher task
starts them on the pool's free streams; the pool's callbacks classify each answer:

- 200: sent (``apns-id``, and ``apns-unique-id`` in the sandbox);
- 410 Unregistered/ExpiredToken, BadDeviceToken, DeviceTokenNotForTopic: the token is dead;
- ExpiredProviderToken: the token is renewed and the notification retried once;
- TooManyProviderTokenUpdates: retried once on new connections (each connection keeps the
  token it started with: a renewed token drains the older connections);
- InvalidProviderToken, TooManyProviderTokenUpdates again, and the certificate errors: the
  app's credentials are refused: its queued and later notifications fail at once with that
  reason, without asking APNs again, until the app is registered again (or, for
  TooManyProviderTokenUpdates, 20 minutes have passed);
- a refused stream (GOAWAY, REFUSED_STREAM): sent again at once, up to 3 times, then like a
  failure;
- 429, 5xx, IdleTimeout, a lost connection or no answer within the pool's request timeout:
  retried with jittered exponential backoff while the notification has not expired;

A notification lost with its connection may have reached APNs: it is retried anyway (a
possible duplicate rather than a certain loss); give it an ``apns-collapse-id`` to make a
duplicate replace the first. When the sender stops (retired, or failed), whatever it still
holds fails with ``SenderStopped``.
- any other 4xx: failed, with Apple's reason.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import trio
from hpack import NeverIndexedHeaderTuple

from server._http2 import ConnectionLost, H2Failure, H2Pool, H2Response, StreamRefused
from server.channels import AppRecord, DeliveryResult

from ._credentials import ProviderToken, client_ssl_context
from ._payload import ApnsRequest

__all__ = ["ApnsSender", "INVALID_TOKEN_REASONS", "CREDENTIAL_REASONS"]

log = logging.getLogger("pigeon.apns")

#: Reasons that mean the device token is dead for this app.
INVALID_TOKEN_REASONS = frozenset({"Unregistered", "ExpiredToken", "BadDeviceToken", "DeviceTokenNotForTopic"})
#: Reasons that mean APNs refuses the app's credentials: stop sending until they change.
CREDENTIAL_REASONS = frozenset(
    {
        "InvalidProviderToken",
        "TooManyProviderTokenUpdates",
        "MissingProviderToken",
        "BadCertificate",
        "BadCertificateEnvironment",
        "BadEnvironmentKeyIdInToken",
        "BadEnvironmentKeyInToken",
        "UnrelatedKeyIdInToken",
    }
)
_RETRY_REASONS = frozenset({"TooManyRequests", "InternalServerError", "ServiceUnavailable", "Shutdown", "IdleTimeout"})
_reason_decoder = msgspec.json.Decoder(dict[str, Any])


class _Batch:
    """The results of one `ApnsSender.send` call, filled in as APNs answers."""

    __slots__ = ("results", "remaining", "done")

    def __init__(self, size: int) -> None:
        self.results: list[DeliveryResult | None] = [None] * size
        self.remaining = size
        self.done = trio.Event()


#: Times a notification is sent again at once after a refused stream, before refusals count
#: as attempts (with backoff).
FREE_REFUSALS = 3


class _Job:
    __slots__ = ("request", "token", "batch", "index", "attempts", "deadline", "expired_token_retried", "refusals")

    def __init__(self, request: ApnsRequest, token: str, deadline: float, batch: _Batch, index: int) -> None:
        self.request = request
        self.token = token
        self.batch = batch
        self.index = index
        self.attempts = 0
        self.deadline = deadline
        self.expired_token_retried = False
        self.refusals = 0


class ApnsSender:
    """Sends one app's notifications to one APNs environment.

    Args:
        app: the app and its credentials.
        environment: ``production`` or ``sandbox``.
        host, port: the APNs endpoint.
        ca_file: trust this CA instead of the system's (for the mock APNs).
        max_connections, streams_per_connection: the pool's size.
        max_queue: notifications queued or in flight at most; `send` waits beyond it.
        retry_window: seconds a notification without expiration is retried at most.
        max_attempts: attempts per notification at most.
    """

    def __init__(
        self,
        app: AppRecord,
        environment: str,
        *,
        host: str,
        port: int,
        ca_file: str | None = None,
        max_connections: int = 4,
        streams_per_connection: int = 100,
        max_queue: int = 10_000,
        retry_window: float = 600.0,
        max_attempts: int = 8,
        backoff_min: float = 0.2,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert app.ios is not None
        self.app = app
        self.record = app.ios
        self.environment = environment
        self.host = host
        self.max_queue = max_queue
        self.retry_window = retry_window
        self.max_attempts = max_attempts
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.clock = clock
        self.pool = H2Pool(
            host,
            port,
            ssl_context=client_ssl_context(self.record, ca_file=ca_file),
            max_connections=max_connections,
            streams_per_connection=streams_per_connection,
            # Every request repeats the authority, topic, push type and provider token.
            stateless_hpack=True,
        )
        self.token = ProviderToken(self.record, clock=clock) if self.record.auth == "token" else None
        self._authority = f"{host}:{port}".encode() if port != 443 else host.encode()
        #: Notifications queued or in flight (at most ``max_queue``), and who waits for room.
        self.held = 0
        self._room = trio.Event()
        self._queue: deque[_Job] = deque()
        self._queued = trio.Event()
        self._retries: list[tuple[float, int, _Job]] = []
        self._retry_added = trio.Event()
        self._order = itertools.count()
        self._random = random.Random()
        #: Why APNs refuses the app's credentials, and until when (None: until they change).
        self.refused: str | None = None
        self.refused_until: float | None = None
        expires = self.record.certificate_expires
        self._certificate_expires = expires.timestamp() if expires is not None else None
        self.counts: dict[str, int] = {}
        self.retiring = False
        self.stopped = False
        #: `send` calls still handing notifications over (a retiring sender waits for them).
        self._sending = 0
        self._retired = trio.Event()

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pool.run)
                nursery.start_soon(self._dispatcher)
                nursery.start_soon(self._retrier)
                task_status.started()
                await self._retired.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stop()

    def _stop(self) -> None:
        """The sender ended (retired, failed or cancelled): settle everything it still holds,
        and every later `send`, so that no caller waits forever."""
        self.stopped = True
        held = list(self._queue) + [job for _, _, job in self._retries]
        self._queue.clear()
        self._retries.clear()
        for job in held:
            self._finish(job, DeliveryResult(status="failed", reason="SenderStopped", attempts=job.attempts,
                                             detail=f"the APNs sender of {self.app.app} stopped"))
        self._room.set()

    def retire(self) -> None:
        """Finish what was handed over, then stop (the app's credentials changed)."""
        self.retiring = True
        self.pool.drop_connections()
        self._check_retired()

    def _check_retired(self) -> None:
        if self.retiring and self.held == 0 and self._sending == 0:
            self._retired.set()

    async def send(self, jobs: list[tuple[ApnsRequest, str]]) -> list[DeliveryResult]:
        """Send ``(request, device token)`` pairs; return their results in order."""
        now = self.clock()
        batch = _Batch(len(jobs))
        results = batch.results
        self._sending += 1
        try:
            for index, (request, token) in enumerate(jobs):
                refused = self._refusal(now)
                if refused is not None:
                    results[index] = refused
                    batch.remaining -= 1
                    continue
                while self.held >= self.max_queue and not self.stopped:  # backpressure: wait for answers
                    if self._room.is_set():
                        self._room = trio.Event()
                    await self._room.wait()
                self.held += 1
                deadline = now + self.retry_window
                if request.expiration is not None:
                    deadline = min(deadline, float(request.expiration)) if request.expiration else now
                job = _Job(request, token, deadline, batch, index)
                if self.stopped:
                    self._finish(job, DeliveryResult(status="failed", reason="SenderStopped", attempts=0,
                                                     detail=f"the APNs sender of {self.app.app} stopped"))
                    continue
                self._queue.append(job)
                self._queued.set()
        finally:
            self._sending -= 1
            self._check_retired()
        if batch.remaining:
            await batch.done.wait()
        return results  # type: ignore[return-value]

    def _refusal(self, now: float) -> DeliveryResult | None:
        if self._certificate_expires is not None and now >= self._certificate_expires:
            return DeliveryResult(
                status="failed", reason="CertificateExpired", attempts=0,
                detail=f"the certificate of {self.app.app} expired; register the app again with a new one",
            )
        if self.refused is None:
            return None
        if self.refused_until is not None and now >= self.refused_until:
            self.refused = self.refused_until = None
            return None
        return DeliveryResult(status="failed", reason=self.refused, attempts=0)

    def _pump(self) -> None:
        """Start queued notifications on the pool's free streams, as many as there are."""
        queue, pool = self._queue, self.pool
        while queue:
            job = queue[0]
            if self.refused is not None:
                queue.popleft()
                self._finish(job, DeliveryResult(status="failed", reason=self.refused, attempts=job.attempts))
                continue
            if not pool.try_submit(self._headers(job), job.request.payload, self._callback(job)):
                return
            queue.popleft()
            job.attempts += 1

    def _callback(self, job: _Job) -> Callable[[Any], None]:
        return lambda outcome: self._answer(job, outcome)

    async def _dispatcher(self) -> None:
        pool = self.pool
        while True:
            self._pump()
            if not self._queue:
                await self._queued.wait()
                self._queued = trio.Event()
                continue
            # Notifications wait and no stream is free: open a connection, or wait for one.
            try:
                await pool.wait_capacity()
            except ConnectionLost as exc:
                # APNs cannot be reached now: everything queued tries again after a backoff.
                queued, self._queue = self._queue, deque()
                for job in queued:
                    job.attempts += 1
                    self._retry_or_fail(job, "ConnectionFailed", None, str(exc))

    def _headers(self, job: _Job) -> list[tuple[bytes, bytes]]:
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/3/device/" + job.token.encode()),
            (b":authority", self._authority),
        ]
        token = self.token
        if token is not None:
            renewals = token.renewals
            headers.append(NeverIndexedHeaderTuple(b"authorization", token.header()))
            if renewals and token.renewals != renewals:
                # A connection keeps one provider token for its life: APNs may refuse a
                # change on a connection younger than 20 minutes (TooManyProviderTokenUpdates).
                self.pool.drop_connections()
        headers.extend(job.request.headers)
        return headers

    # -- answers --------------------------------------------------------------------------

    def _answer(self, job: _Job, outcome: H2Response | H2Failure) -> None:
        if isinstance(outcome, StreamRefused):
            self._count("refused_stream")
            job.refusals += 1
            if job.refusals <= FREE_REFUSALS:
                # Not processed by APNs (a GOAWAY): again at once, without counting an attempt.
                job.attempts -= 1
                self._queue.appendleft(job)
                self._queued.set()
            else:  # refused again and again: back off like any failure
                self._retry_or_fail(job, "StreamRefused", None, str(outcome))
            return
        if isinstance(outcome, H2Failure):
            self._count("connection_lost")
            self._retry_or_fail(job, "ConnectionLost", None, str(outcome))
            return
        status = outcome.status
        apns_id = outcome.headers.get(b"apns-id", b"").decode() or None
        if status == 200:
            unique = outcome.headers.get(b"apns-unique-id")
            self._finish(
                job,
                DeliveryResult(
                    status="sent",
                    status_code=200,
                    provider_id=apns_id,
                    unique_id=unique.decode() if unique else None,
                    attempts=job.attempts,
                ),
            )
            return
        try:
            body = _reason_decoder.decode(outcome.body) if outcome.body else {}
        except msgspec.DecodeError:
            body = {}
        reason = str(body.get("reason") or f"HTTP{status}")
        result = DeliveryResult(status="failed", reason=reason, status_code=status, provider_id=apns_id, attempts=job.attempts)
        if reason in INVALID_TOKEN_REASONS:
            result.status = "invalid"
            timestamp = body.get("timestamp")
            if isinstance(timestamp, int):
                result.invalid_since_us = timestamp * 1000
            self._finish(job, result)
        elif reason == "ExpiredProviderToken" and not job.expired_token_retried and self.token is not None:
            job.expired_token_retried = True
            if self.token.renew_now():
                log.info("%s: APNs says the provider token expired; renewed it", self.app.app)
            self.pool.drop_connections()  # APNs keeps refusing on that connection
            job.attempts -= 1
            self._queue.appendleft(job)
            self._queued.set()
        elif reason == "TooManyProviderTokenUpdates" and not job.expired_token_retried:
            # Only this connection saw two tokens: new connections, and this one once more.
            job.expired_token_retried = True
            self.pool.drop_connections()
            job.attempts -= 1
            self._queue.appendleft(job)
            self._queued.set()
        elif reason in CREDENTIAL_REASONS or reason == "ExpiredProviderToken":
            self._refuse(reason)
            self._finish(job, result)
        elif reason in _RETRY_REASONS or status >= 500:
            self._retry_or_fail(job, reason, status, None)
        else:
            self._finish(job, result)

    def _refuse(self, reason: str) -> None:
        if self.refused is None:
            log.error(
                "APNs refuses the credentials of %s (%s): its notifications fail until they are registered again",
                self.app.app, reason,
            )
        self.refused = reason
        if reason == "TooManyProviderTokenUpdates":
            self.refused_until = self.clock() + ProviderToken.MIN_AGE
        elif reason == "ExpiredProviderToken" and self.token is not None:
            # Renewed less than 20 minutes ago and still refused: a new token may be made
            # (and tried) once this one is 20 minutes old.
            self.refused_until = self.clock() + max(0.0, ProviderToken.MIN_AGE - self.token.age)
        else:
            self.refused_until = None
        queued, self._queue = self._queue, deque()
        for job in queued:
            self._finish(job, DeliveryResult(status="failed", reason=reason, attempts=job.attempts))
        retries, self._retries = self._retries, []
        for _, _, job in retries:
            self._finish(job, DeliveryResult(status="failed", reason=reason, attempts=job.attempts))

    def _retry_or_fail(self, job: _Job, reason: str, status: int | None, detail: str | None) -> None:
        delay = min(self.backoff_max, self.backoff_min * 2 ** (job.attempts - 1)) * self._random.uniform(0.5, 1.0)
        when = self.clock() + delay
        if job.attempts >= self.max_attempts or when > job.deadline:
            self._finish(
                job,
                DeliveryResult(status="failed", reason=reason, status_code=status, attempts=job.attempts, detail=detail),
            )
            return
        self._count("retries")
        heapq.heappush(self._retries, (when, next(self._order), job))
        self._retry_added.set()

    async def _retrier(self) -> None:
        while True:
            if not self._retries:
                self._retry_added = trio.Event()
                await self._retry_added.wait()
                continue
            when = self._retries[0][0]
            delay = when - self.clock()
            if delay > 0:
                self._retry_added = trio.Event()
                with trio.move_on_after(delay):
                    await self._retry_added.wait()
                continue
            _, _, job = heapq.heappop(self._retries)
            self._queue.append(job)
            self._queued.set()

    def _finish(self, job: _Job, result: DeliveryResult) -> None:
        self._count(result.status if result.status != "failed" else f"failed:{result.reason}")
        batch = job.batch
        batch.results[job.index] = result
        batch.remaining -= 1
        if not batch.remaining:
            batch.done.set()
        self.held -= 1
        self._room.set()
        if self.retiring:
            self._check_retired()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def statistics(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "pool": self.pool.statistics().as_dict(),
            "queued": len(self._queue),
            "retrying": len(self._retries),
            "refused": self.refused,
            "token_renewals": self.token.renewals if self.token else None,
            "outcomes": dict(self.counts),
        }

