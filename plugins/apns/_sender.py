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
holds fails with ``SenderStopped`` (`server.delivery.sender.PooledSender` keeps these promises for
both channels).
- any other 4xx: failed, with Apple's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from hpack import NeverIndexedHeaderTuple

from server.delivery.breaker import CircuitBreaker
from server.delivery.http2 import H2Pool, H2Response
from server.delivery.sender import Job, PooledSender, Progress
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


class ApnsSender(PooledSender):
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
        request_timeout: a request unanswered this long fails (and is retried).
        breaker: the circuit breaker (`server.delivery.breaker`; None: none).
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
        request_timeout: float = 30.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        assert app.ios is not None
        self.app = app
        self.record = app.ios
        self.environment = environment
        self.host = host
        pool = H2Pool(
            host,
            port,
            ssl_context=client_ssl_context(self.record, ca_file=ca_file),
            max_connections=max_connections,
            streams_per_connection=streams_per_connection,
            request_timeout=request_timeout,
            # Every request repeats the authority, topic, push type and provider token.
        )
        super().__init__(
            pool, f"the APNs sender of {app.handle}", max_queue=max_queue, retry_window=retry_window,
            max_attempts=max_attempts, backoff_min=backoff_min, backoff_max=backoff_max, clock=clock, breaker=breaker,
        )
        self.token = ProviderToken(self.record, clock=clock) if self.record.auth == "token" else None
        self._authority = f"{host}:{port}".encode() if port != 443 else host.encode()
        #: Why APNs refuses the app's credentials, and until when (None: until they change).
        self.refused: str | None = None
        self.refused_until: float | None = None
        expires = self.record.certificate_expires
        self._certificate_expires = expires.timestamp() if expires is not None else None

    async def send(self, jobs: list[tuple[ApnsRequest, str]], progress: Progress | None = None) -> list[DeliveryResult]:
        """Send ``(request, device token)`` pairs; return their results in order (told to
        ``progress`` as they come, too)."""
        now = self.clock()
        deadlines = [
            now if request.expiration == 0 else float(request.expiration) if request.expiration is not None else now + self.retry_window
            for request, _ in jobs
        ]
        return await self._send(jobs, deadlines, progress)

    def _refusal(self, now: float) -> DeliveryResult | None:
        if self._certificate_expires is not None and now >= self._certificate_expires:
            return DeliveryResult(
                status="failed", reason="CertificateExpired", attempts=0,
                detail=f"the certificate of {self.app.handle} expired; register the app again with a new one",
            )
        if self.refused is None:
            return None
        if self.refused_until is not None and now >= self.refused_until:
            self.refused = self.refused_until = None
            return None
        return DeliveryResult(status="failed", reason=self.refused, attempts=0)

    def _startable(self) -> int:
        if self.refused is not None:
            reason = self.refused
            self._fail_held(lambda job: DeliveryResult(status="failed", reason=reason, attempts=job.attempts))
            return 0
        return len(self._queue)

    def _headers(self, job: Job) -> list[tuple[bytes, bytes]]:
        request, device_token = job.payload
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/3/device/" + device_token.encode()),
            (b":authority", self._authority),
        ]
        token = self.token
        if token is not None:
            renewals = token.renewals
            job.header = token.header()
            headers.append(NeverIndexedHeaderTuple(b"authorization", job.header))
            if renewals and token.renewals != renewals:
                # A connection keeps one provider token for its life: APNs may refuse a
                # change on a connection younger than 20 minutes (TooManyProviderTokenUpdates).
                self.pool.drop_connections()
        headers.extend(request.headers)
        return headers

    def _body(self, job: Job) -> bytes:
        return job.payload[0].payload

    # -- answers --------------------------------------------------------------------------

    def _response(self, job: Job, outcome: H2Response) -> None:
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
        elif reason == "ExpiredProviderToken" and not job.retried and self.token is not None:
            job.retried = True
            if job.header == self.token.header():  # not renewed since it was sent
                if self.token.renew_now():
                    log.info("%s: APNs says the provider token expired; renewed it", self.app.handle)
                    self.pool.drop_connections()  # the connections that carry the old token
            self._requeue(job)
        elif reason == "TooManyProviderTokenUpdates" and not job.retried:
            # Only this connection saw two tokens: new connections, and this one once more.
            job.retried = True
            self.pool.drop_connections()
            self._requeue(job)
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
                self.app.handle, reason,
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
        self._fail_held(lambda job: DeliveryResult(status="failed", reason=reason, attempts=job.attempts))

    def statistics(self) -> dict[str, Any]:
        return {
            **super().statistics(),
            "environment": self.environment,
            "refused": self.refused,
            "token_renewals": self.token.renewals if self.token else None,
        }
