"""One Firebase project: its connection pool, its access token, its rate limit, retries.

`FcmSender.send` queues messages (waiting while ``max_queue`` are queued or in flight:
backpressure) and returns their results once FCM has answered each. A dispatcher task starts
them on the pool's free streams, at most ``rate_per_minute`` a minute (a token bucket holding
one second's worth), with the project's access token; the pool's callbacks classify each
answer by FCM's error code (`classify`):

- 200: sent (the message name);
- UNREGISTERED, SENDER_ID_MISMATCH, and INVALID_ARGUMENT about ``message.token``: the token is
  dead for this project;
- QUOTA_EXCEEDED (429): the project pauses for ``Retry-After`` (60 s without it) and the
  message is retried then; UNAVAILABLE, INTERNAL and other 5xx (an HTML 502 too): retried
  with jittered exponential backoff, at least ``Retry-After``;
- 401 without FCM detail: the access token is renewed and the message retried once; if a
  fresh token is refused too, the project's credentials are refused;
- 403 without FCM detail (permission, disabled API): the credentials are refused;
- any other 4xx: failed, with FCM's error code.

Retries stop at the message's TTL, ``retry_window`` or ``max_attempts``, whichever comes
first. Refused credentials (the token endpoint says no, or FCM keeps refusing the token) fail
the queued and new messages at once with reason ``InvalidCredentials`` for a backoff period
that doubles (30 s up to 10 min): no retry storm against Google. A token endpoint that cannot
be reached sends the queued messages to the retry queue instead.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import trio
from hpack import NeverIndexedHeaderTuple

from server.delivery.breaker import CircuitBreaker
from server.delivery.http2 import H2Pool, H2Response
from server.delivery.sender import Job, PooledSender, Progress
from server.channels import AndroidRecord, CredentialsError, DeliveryResult

from ._credentials import AccessToken, ssl_context

__all__ = ["FcmSender", "classify", "FcmAnswer"]

log = logging.getLogger("pigeon.fcm")

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
_INVALID_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
_decoder = msgspec.json.Decoder()


class FcmAnswer:
    """What an FCM answer means (see `classify`).

    Attributes:
        action: ``sent``, ``invalid``, ``retry``, ``renew`` (401), ``refuse`` (credentials) or ``fail``.
        reason: FCM's error code (``UNREGISTERED``), else its canonical status, else ``HTTP<status>``.
        detail: FCM's message, or the field violations.
        name: the message name, when sent.
        retry_after: seconds from ``Retry-After``, when given.
    """

    __slots__ = ("action", "reason", "detail", "name", "retry_after")

    def __init__(self, action: str, reason: str | None = None, detail: str | None = None,
                 name: str | None = None, retry_after: float | None = None) -> None:
        self.action = action
        self.reason = reason
        self.detail = detail
        self.name = name
        self.retry_after = retry_after


def _retry_after(value: bytes | None, now: float) -> float | None:
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify(status: int, headers: dict[bytes, bytes], body: bytes, *, now: float | None = None) -> FcmAnswer:
    """Read an answer of ``messages:send`` (sans-IO)."""
    try:
        doc = _decoder.decode(body) if body else None
    except msgspec.DecodeError:
        doc = None  # a proxy's HTML page, for instance
    if status == 200:
        name = doc.get("name") if isinstance(doc, dict) else None
        return FcmAnswer("sent", name=name if isinstance(name, str) else None)
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = None
    token_field = False
    violations = []
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type")
        if kind == _FCM_ERROR and isinstance(detail.get("errorCode"), str):
            code = detail["errorCode"]
        elif kind == _BAD_REQUEST and isinstance(detail.get("fieldViolations"), list):
            for violation in detail["fieldViolations"]:
                if isinstance(violation, dict):
                    field = violation.get("field")
                    violations.append(f"{field}: {violation.get('description')}")
                    token_field = token_field or field == "message.token"
    if code == "APNS_AUTH_ERROR":
        code = "THIRD_PARTY_AUTH_ERROR"  # its old name
    canonical = error.get("status") if isinstance(error.get("status"), str) else None
    reason = code or canonical or f"HTTP{status}"
    message = error.get("message") if isinstance(error.get("message"), str) else None
    detail = "; ".join(filter(None, [message, *violations])) or None
    retry_after = _retry_after(headers.get(b"retry-after"), time.time() if now is None else now)
    if code in _INVALID_TOKEN_CODES:
        return FcmAnswer("invalid", reason, detail)
    if code == "INVALID_ARGUMENT" and (token_field or "registration token" in (message or "").lower()):
        return FcmAnswer("invalid", reason, detail)
    if status == 403 and code is None and "senderid mismatch" in (message or "").lower():
        return FcmAnswer("invalid", "SENDER_ID_MISMATCH", detail)  # observed without an FcmError detail
    if code in _RETRY_CODES or status == 429 or status >= 500:
        return FcmAnswer("retry", reason, detail, retry_after=retry_after)
    if status == 401 and code is None:
        return FcmAnswer("renew", reason, detail)
    if status == 403 and code is None:
        return FcmAnswer("refuse", reason, detail)
    return FcmAnswer("fail", reason, detail)


class FcmSender(PooledSender):
    """Sends the messages of one Firebase project (one service account).

    Args:
        record: the service account (from any of the project's apps).
        host, port: FCM's endpoint.
        http: the HTTP client for the token exchange.
        token_uri: exchange assertions here instead of at the account's ``token_uri``.
        ca_file: trust this CA instead of the system's (for the mock FCM).
        max_connections, streams_per_connection: the pool's size.
        max_queue: messages queued or in flight at most; `send` waits beyond it.
        rate_per_minute: messages started per minute at most.
        retry_window: seconds a message without TTL is retried at most.
        max_attempts: attempts per message at most.
        backoff_min, backoff_max: retry delays (Google asks for at least 10 s: the jitter
            only lengthens them).
        request_timeout: a request unanswered this long fails (and is retried).
        breaker: the circuit breaker (`server.delivery.breaker`; None: none).
    """

    REFUSAL_MIN = 30.0
    REFUSAL_MAX = 600.0
    #: Pause after QUOTA_EXCEEDED without Retry-After, and at most.
    QUOTA_PAUSE = 60.0
    QUOTA_PAUSE_MAX = 300.0
    #: QUOTA_EXCEEDED answers within a second that mean the project's quota, not one device's.
    QUOTA_BURST = 3

    def __init__(
        self,
        record: AndroidRecord,
        *,
        host: str,
        port: int,
        http: httpx.AsyncClient,
        token_uri: str | None = None,
        ca_file: str | None = None,
        max_connections: int = 4,
        streams_per_connection: int = 100,
        max_queue: int = 10_000,
        rate_per_minute: int = 600_000,
        retry_window: float = 600.0,
        max_attempts: int = 8,
        backoff_min: float = 10.0,
        backoff_max: float = 300.0,
        clock: Callable[[], float] = time.time,
        request_timeout: float = 30.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.record = record
        self.project = record.project_id
        pool = H2Pool(
            host,
            port,
            ssl_context=ssl_context(ca_file),
            max_connections=max_connections,
            streams_per_connection=streams_per_connection,
            request_timeout=request_timeout,
            # Every request repeats the authority, the path and the access token.
        )
        super().__init__(
            pool, f"the FCM sender of {self.project}", max_queue=max_queue, retry_window=retry_window,
            max_attempts=max_attempts, backoff_min=backoff_min, backoff_max=backoff_max, jitter=(1.0, 1.5), clock=clock,
            breaker=breaker,
        )
        self.token = AccessToken(record, http=http, token_uri=token_uri, clock=clock)
        authority = f"{host}:{port}" if port != 443 else host
        self._static = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", f"/v1/projects/{self.project}/messages:send".encode()),
            (b":authority", authority.encode()),
            (b"content-type", b"application/json; charset=UTF-8"),
        ]
        #: Messages started per second, and the bucket (at most one second's worth).
        self.rate = rate_per_minute / 60.0
        self._bucket = max(self.rate, 1.0)
        self._bucket_at = 0.0
        #: No message starts before this (clock seconds): FCM said QUOTA_EXCEEDED.
        self.paused_until = 0.0
        #: Why the credentials are refused, and until when.
        self.refused: CredentialsError | None = None
        self.refused_until = 0.0
        self._refusal_backoff = self.REFUSAL_MIN
        #: No token exchange before this (after the endpoint failed).
        self._exchange_after = 0.0
        self._renewing = False
        self._quota_answers: deque[float] = deque()
        #: The headers of the current access token.
        self._headers_for: tuple[bytes, list[tuple[bytes, bytes]]] = (b"", [])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._bucket_at = trio.current_time()
        await super().run(task_status=task_status)

    async def send(self, bodies: list[bytes], ttls: list[int | None] | None = None,
                   progress: Progress | None = None) -> list[DeliveryResult]:
        """Send ``messages:send`` request bodies; return their results in order.

        Args:
            bodies: request bodies (`plugins.fcm._message.encode_send`).
            ttls: each message's TTL in seconds, if it has one: no retry after it.
            progress: told each result as it comes, and the messages waiting for a retry.
        """
        now = self.clock()
        never = now + self.retry_window
        if ttls is None:
            deadlines = [never] * len(bodies)
        else:
            deadlines = [never if (ttl := ttls[i]) is None else now + ttl for i in range(len(bodies))]
        return await self._send(bodies, deadlines, progress)

    def _refusal(self, now: float) -> DeliveryResult | None:
        if self.refused is None:
            return None
        if now >= self.refused_until:
            self.refused = None
            return None
        return DeliveryResult(status="failed", reason=self.refused.reason, attempts=0, detail=self.refused.message)

    # -- dispatching ----------------------------------------------------------------------

    def _startable(self) -> int:
        now = self.clock()
        refused = self.refused
        if refused is not None:
            if now < self.refused_until:
                self._fail_held(lambda job: DeliveryResult(status="failed", reason=refused.reason, attempts=job.attempts,
                                                           detail=refused.message))
                return 0
            self.refused = None
        if now < self.paused_until or not self.token.usable(now):
            return 0
        if self.token.due(now) and not self._renewing and now >= self._exchange_after and self._nursery is not None:
            self._renewing = True  # renew in the background while this token still works
            self._nursery.start_soon(self._renew)
        # The token bucket.
        tick = trio.current_time()
        self._bucket = min(max(self.rate, 1.0), self._bucket + (tick - self._bucket_at) * self.rate)
        self._bucket_at = tick
        return int(self._bucket)

    def _started(self, count: int) -> None:
        self._bucket -= count

    def _headers(self, job: Job) -> list[tuple[bytes, bytes]]:
        header = self.token.header
        job.header = header
        if self._headers_for[0] != header:
            self._headers_for = (header, self._static + [NeverIndexedHeaderTuple(b"authorization", header)])
        return self._headers_for[1]

    def _body(self, job: Job) -> bytes:
        return job.payload

    async def _hold(self) -> bool:
        now = self.clock()
        if not self._queue:
            return True  # the refusal failed them all
        if now < self.paused_until:
            self._expire_overdue("QUOTA_EXCEEDED", "FCM's project quota was exceeded, and the message's TTL ran out while waiting")
            await self._sleep_or_wake(min(self.paused_until - now, 1.0))
        elif not self.token.usable(now):
            if self._renewing:
                await self._sleep_or_wake(0.1)  # the background renewal wakes it
            else:
                await self._authorize()
        elif self._bucket < 1:
            await self._sleep_or_wake((1 - self._bucket) / self.rate)
        else:
            return False
        return True

    async def _authorize(self) -> None:
        """Get an access token for the queued messages (the dispatcher alone calls this)."""
        if self.clock() < self._exchange_after:
            self._defer_queued("TokenEndpointUnavailable", "the token endpoint failed moments ago")
            return
        try:
            await self.token.refresh()
        except CredentialsError as exc:
            self._token_failed(exc)
        else:
            self._refusal_backoff = self.REFUSAL_MIN

    async def _renew(self) -> None:
        try:
            await self.token.refresh()
        except CredentialsError as exc:
            # Try again later, not at the next message (the current token is still valid).
            self._exchange_after = self.clock() + self.backoff_min
            log.warning("%s: renewing the access token failed (the current one is still valid): %s", self.project, exc)
        finally:
            self._renewing = False
            self._queued.set()

    def _token_failed(self, exc: CredentialsError) -> None:
        if exc.reason == "TokenEndpointUnavailable":
            log.warning("%s: %s", self.project, exc)
            self._exchange_after = self.clock() + self.backoff_min
            self._defer_queued(exc.reason, exc.message)
        else:
            self._refuse(exc)

    def _quota_exceeded(self, pause: float) -> None:
        """One device over its rate gets a QUOTA_EXCEEDED too: the project pauses only when
        several come within a second."""
        now = self.clock()
        recent = self._quota_answers
        recent.append(now)
        while recent and recent[0] < now - 1.0:
            recent.popleft()
        if len(recent) >= self.QUOTA_BURST and now + pause > self.paused_until:
            self.paused_until = now + pause
            self._count("quota_pauses")

    def _refuse(self, exc: CredentialsError) -> None:
        now = self.clock()
        if self.refused is None or now >= self.refused_until:  # a new episode: the period doubles
            log.error("%s: %s; its messages fail for %.0fs", self.project, exc.message, self._refusal_backoff)
            self.refused = exc
            self.refused_until = now + self._refusal_backoff
            self._refusal_backoff = min(self.REFUSAL_MAX, self._refusal_backoff * 2)
        self._fail_held(lambda job: DeliveryResult(status="failed", reason=exc.reason, attempts=job.attempts, detail=exc.message))

    # -- answers --------------------------------------------------------------------------

    def _response(self, job: Job, outcome: H2Response) -> None:
        status = outcome.status
        answer = classify(status, outcome.headers, outcome.body, now=self.clock())
        action = answer.action
        if action == "sent":
            self._finish(job, DeliveryResult(status="sent", status_code=200, provider_id=answer.name, attempts=job.attempts))
            return
        result = DeliveryResult(status="failed", reason=answer.reason, detail=answer.detail, status_code=status, attempts=job.attempts)
        if action == "invalid":
            result.status = "invalid"
            self._finish(job, result)
        elif action == "retry":
            after = answer.retry_after
            if answer.reason == "QUOTA_EXCEEDED" or status == 429:
                after = min(after if after is not None else self.QUOTA_PAUSE, self.QUOTA_PAUSE_MAX)
                self._quota_exceeded(after)
            self._retry_or_fail(job, answer.reason or f"HTTP{status}", status, answer.detail, after)
        elif action == "renew":
            if not job.retried:
                # The token expired or was revoked early: renew it (once per message) and retry.
                job.retried = True
                self.token.invalidate(job.header)
                self._count("token_rejected")
                self._requeue(job)
            elif job.header != self.token.header and job.attempts < self.max_attempts:
                self._requeue(job, free=False)  # sent with an older token: once more with the new one
            else:
                # A renewed token refused too: the service account cannot send.
                self._refuse(CredentialsError(
                    f"FCM refuses the access tokens of {self.record.client_email} for {self.project}: {answer.detail}",
                    "InvalidCredentials",
                ))
                self._finish(job, result)
        elif action == "refuse":
            self._refuse(CredentialsError(
                f"FCM refuses {self.record.client_email} for {self.project} ({answer.reason}): {answer.detail}",
                "InvalidCredentials",
            ))
            self._finish(job, result)
        else:
            self._finish(job, result)

    def statistics(self) -> dict[str, Any]:
        return {
            **super().statistics(),
            "project": self.project,
            "refused": None if self.refused is None else self.refused.reason,
            "paused_s": max(0.0, self.paused_until - self.clock()),
            "token_renewals": self.token.renewals,
        }
