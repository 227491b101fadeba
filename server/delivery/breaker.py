"""A circuit breaker for one sender (an app and environment at APNs, a project at FCM).

Sans-IO bookkeeping, on the sender's clock; the sender (`server.delivery.sender`) asks it
before it queues or starts a notification and tells it what each attempt showed:

- **closed**: everything goes through. Failures that say the provider is unwell (5xx, 429, a
  lost connection, no answer in time; not a GOAWAY's refused streams) count in a row;
  an answer that says it is well (a success, or a 4xx about one notification such as
  ``BadDeviceToken``) resets the run. ``failures`` in a row, or ``connect_failures``
  connections in a row that could not be opened (nothing listening, a TLS failure), open it;
- **open**: for ``cooldown`` seconds every notification handed over fails at once with
  ``CircuitOpen``, and so does every one the sender still holds (queued or waiting for a
  retry): nothing is sent;
- **half-open**, once the cool-down has passed: one notification (the probe) is sent; the
  others wait for its verdict. A healthy answer closes the breaker (the cool-down returns to
  ``cooldown``); a failure opens it again for twice the last cool-down, up to
  ``cooldown_max``. A probe with no verdict after ``probe_timeout`` lets another through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.runtime.config import SenderSettings

__all__ = ["CircuitBreaker", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """See the module docstring. ``now`` arguments are the sender's clock, in seconds."""

    def __init__(self, *, failures: int = 20, connect_failures: int = 3, cooldown: float = 10.0,
                 cooldown_max: float = 300.0, probe_timeout: float = 40.0) -> None:
        self.failures = failures
        self.connect_failures = connect_failures
        self.cooldown = cooldown
        self.cooldown_max = cooldown_max
        self.probe_timeout = probe_timeout
        self.state = CLOSED
        #: Unhealthy outcomes in a row, and the last one's reason.
        self.run = 0
        self.last_failure: str | None = None
        self.open_until = 0.0
        self._period = cooldown
        self._probe_at: float | None = None
        #: Times it opened, probes sent, and notifications refused (``CircuitOpen``).
        self.opened = 0
        self.probes = 0
        self.refused = 0

    @classmethod
    def from_settings(cls, settings: SenderSettings, *, connect_timeout: float = 10.0) -> CircuitBreaker | None:
        """The breaker ``[apns]`` or ``[fcm]`` asks for (None: ``breaker = false``)."""
        if not settings.breaker:
            return None
        return cls(failures=settings.breaker_failures, connect_failures=settings.breaker_connect_failures,
                   cooldown=settings.breaker_cooldown_s, cooldown_max=settings.breaker_cooldown_max_s,
                   probe_timeout=settings.request_timeout_s + connect_timeout)

    def closed(self, now: float) -> bool:
        """Whether a notification handed over now may be queued (open: it fails at once)."""
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
            self._probe_at = None
        return self.state != OPEN

    def startable(self, now: float, queued: int) -> int:
        """How many of ``queued`` notifications may start now (all, one probe, or none)."""
        if not self.closed(now):
            return 0
        if self.state == CLOSED:
            return queued
        if self._probe_at is None or now - self._probe_at > self.probe_timeout:
            return min(queued, 1)
        return 0

    def started(self, now: float) -> None:
        if self.state == HALF_OPEN and (self._probe_at is None or now - self._probe_at > self.probe_timeout):
            self._probe_at = now
            self.probes += 1

    def success(self) -> None:
        self.run = 0
        if self.state != CLOSED:
            self.state = CLOSED
            self._period = self.cooldown

    def failure(self, now: float, reason: str, *, connects_failed: int = 0) -> bool:
        """An unhealthy outcome (``connects_failed``: connections failed in a row so far, for
        a failed connect); True if the breaker is open now (it may just have opened)."""
        self.run += 1
        self.last_failure = reason
        if self.state == HALF_OPEN and self._probe_at is not None:
            self._open(now, self._period * 2)
        elif self.state == HALF_OPEN and connects_failed:
            self._open(now, self._period * 2)  # the probe could not even connect
        elif self.state == CLOSED and (self.run >= self.failures or connects_failed >= self.connect_failures):
            self._open(now, self.cooldown)
        return self.state == OPEN

    def _open(self, now: float, period: float) -> None:
        self._period = min(self.cooldown_max, period)
        self.state = OPEN
        self.open_until = now + self._period
        self._probe_at = None
        self.opened += 1

    def detail(self, now: float) -> str:
        return (f"{self.run} failure(s) in a row (last: {self.last_failure}); the circuit is open for"
                f" {max(0.0, self.open_until - now):.1f}s more, then one notification probes the provider")

    def statistics(self, now: float) -> dict[str, Any]:
        self.closed(now)
        return {
            "state": self.state,
            "failures_in_a_row": self.run,
            "last_failure": self.last_failure,
            "open_for_s": round(max(0.0, self.open_until - now), 3) if self.state == OPEN else 0.0,
            "opened": self.opened,
            "probes": self.probes,
            "refused": self.refused,
        }
