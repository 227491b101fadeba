"""What the HTTP/2 push senders share (APNs, FCM, and a plugin's own): a bounded queue in
front of an `H2Pool`, results per `send` call, retries with jittered backoff, and an end
that settles everything.

A `PooledSender` subclass says how a queued job becomes a request (`_headers`, `_body`),
how many may start now (`_startable`), what to wait for when none may (`_hold`), and what an
answer means (`_response`). The base class guarantees the rest:

- ``send`` waits while ``max_queue`` jobs are queued or in flight (backpressure), then
  returns every job's `DeliveryResult` in order once each is settled;
- a refused stream (GOAWAY, REFUSED_STREAM) is sent again at once, uncounted, up to
  `FREE_REFUSALS` times, then counts as an attempt; a lost connection or a request timeout
  is retried with jittered exponential backoff, never after the job's deadline or
  ``max_attempts``;
- a job that waits in the queue past its deadline, with no stream free for the pool's
  request timeout (a server allowing no stream), fails with ``NotSent``;
- ``retire`` lets what was handed over finish (``send`` calls in progress included), then
  stops; however the sender stops, what it still holds fails with ``SenderStopped``, and so
  does any later ``send``: no caller waits forever;
- with a `CircuitBreaker` (`server.delivery.breaker`), a provider that keeps failing (5xx,
  429, lost connections, connections that cannot be opened) is left alone for a cool-down:
  what the sender holds and what it is handed fail at once with ``CircuitOpen``; then one
  notification probes it;
- a caller may follow its notifications as they settle (`Progress`): each result as soon as
  it is known, and how many of them wait for a retry, so that what succeeds is not held
  back by what is retried.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import trio

from server.delivery.breaker import HALF_OPEN, CircuitBreaker
from server.delivery.http2 import ConnectionLost, H2Failure, H2Pool, H2Response, StreamRefused
from server.channels import CredentialsError, DeliveryResult

__all__ = ["PooledSender", "Senders", "Job", "FREE_REFUSALS", "Progress", "Mapped", "Collected"]

log = logging.getLogger("pigeon.delivery")

#: Times a job is sent again at once after a refused stream, before refusals count as attempts.
FREE_REFUSALS = 3


class Progress:
    """What a caller of `PooledSender._send` (through a channel's ``send_each``) is told as its
    notifications go: each one's result once it is settled, and how many of them begin
    (``+n``) or end (``-n``) waiting for a retry. Called from the sender's tasks: do no I/O."""

    def result(self, index: int, result: DeliveryResult) -> None:
        """Notification ``index`` is settled with ``result`` (once per notification)."""

    def waiting(self, delta: int) -> None:
        """``delta`` more (or fewer) notifications wait for a retry."""


class Mapped(Progress):
    """``progress`` for a part of the caller's notifications: index ``i`` here is
    ``indexes[i]`` there."""

    __slots__ = ("progress", "indexes")

    def __init__(self, progress: Progress, indexes: list[int]) -> None:
        self.progress = progress
        self.indexes = indexes

    def result(self, index: int, result: DeliveryResult) -> None:
        self.progress.result(self.indexes[index], result)

    def waiting(self, delta: int) -> None:
        self.progress.waiting(delta)


class Collected(Progress):
    """The results of ``size`` notifications, collected (a channel's ``send`` over its
    ``send_each``)."""

    __slots__ = ("_results",)

    def __init__(self, size: int) -> None:
        self._results: list[DeliveryResult | None] = [None] * size

    def result(self, index: int, result: DeliveryResult) -> None:
        self._results[index] = result

    def results(self) -> list[DeliveryResult]:
        assert all(r is not None for r in self._results), "a notification has no result"
        return self._results  # type: ignore[return-value]


class _Batch:
    """The results of one `PooledSender.send` call, filled in as answers come."""

    __slots__ = ("results", "remaining", "done", "progress")

    def __init__(self, size: int, progress: Progress | None = None) -> None:
        self.results: list[DeliveryResult | None] = [None] * size
        self.remaining = size
        self.done = trio.Event()
        self.progress = progress


class Job:
    """One notification in a sender: its payload (the subclass's), and its bookkeeping.

    Attributes:
        retried: a provider-specific second chance was used (an expired token, a 401).
        header: what the subclass wants to remember of the last request (an auth header).
    """

    __slots__ = ("payload", "batch", "index", "attempts", "deadline", "refusals", "retried", "header", "queued_at",
                 "parked")

    def __init__(self, payload: Any, deadline: float, batch: _Batch, index: int, queued_at: float) -> None:
        self.payload = payload
        #: When it last joined the queue.
        self.queued_at = queued_at
        self.batch = batch
        self.index = index
        self.attempts = 0
        self.deadline = deadline
        self.refusals = 0
        self.retried = False
        self.header = b""
        #: Waiting for a retry (told to the batch's `Progress`).
        self.parked = False


class PooledSender:
    """The base of the senders; see the module docstring.

    Args:
        pool: the connections (run by `run`).
        name: how messages name the sender (``the APNs sender of com.acme.app``).
        max_queue: jobs queued or in flight at most; `send` waits beyond it.
        retry_window: seconds a job is retried at most (its deadline may be sooner).
        max_attempts: attempts per job at most.
        backoff_min, backoff_max: retry delays, doubling per attempt.
        jitter: the delay is multiplied by a random factor in this range.
        clock: seconds since the epoch (deadlines are on this clock).
        breaker: the circuit breaker (None: none).
    """

    def __init__(
        self,
        pool: H2Pool,
        name: str,
        *,
        max_queue: int,
        retry_window: float,
        max_attempts: int,
        backoff_min: float,
        backoff_max: float,
        jitter: tuple[float, float] = (0.5, 1.0),
        clock: Callable[[], float] = time.time,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.pool = pool
        self.breaker = breaker
        self.name = name
        self.max_queue = max_queue
        self.retry_window = retry_window
        self.max_attempts = max_attempts
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.clock = clock
        #: Jobs queued or in flight (at most ``max_queue``), and who waits for room.
        self.held = 0
        self._room = trio.Event()
        self._queue: deque[Job] = deque()
        self._queued = trio.Event()
        self._retries: list[tuple[float, int, Job]] = []
        self._retry_added = trio.Event()
        self._order = itertools.count()
        self._random = random.Random()
        self.counts: dict[str, int] = {}
        self.retiring = False
        self.stopped = False
        #: `send` calls still handing jobs over (a retiring sender waits for them).
        self._sending = 0
        self._retired = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: The last lost connection's error (`_answer`).
        self._last_lost: object = None
        #: The pool's failed connections the breaker was told of.
        self._connects_seen = 0
        #: When a job last started (clock seconds).
        self._last_start = clock()

    # -- what subclasses say ----------------------------------------------------------------

    def _refusal(self, now: float) -> DeliveryResult | None:
        """A result for a job handed over now that must not be sent (refused credentials)."""
        return None

    def _startable(self) -> int:
        """How many queued jobs may start now (0: call `_hold`)."""
        return len(self._queue)

    def _started(self, count: int) -> None:
        """``count`` jobs were just started."""

    async def _hold(self) -> bool:
        """Jobs wait and `_startable` said 0: wait for what blocks them; False if nothing does
        (then the dispatcher waits for the pool's capacity)."""
        return False

    def _headers(self, job: Job) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError

    def _body(self, job: Job) -> bytes:
        raise NotImplementedError

    def _response(self, job: Job, response: H2Response) -> None:
        """Classify an answer: `_finish`, `_retry_or_fail` or `_requeue` the job."""
        raise NotImplementedError

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.pool.run)
                nursery.start_soon(self._dispatcher)
                nursery.start_soon(self._retrier)
                nursery.start_soon(self._expirer)
                task_status.started()
                await self._retired.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stop()

    def retire(self) -> None:
        """Finish what was handed over, then stop (the credentials changed)."""
        self.retiring = True
        self.pool.drop_connections()
        self._check_retired()

    def _check_retired(self) -> None:
        if self.retiring and self.held == 0 and self._sending == 0:
            self._retired.set()

    def _stopped_result(self, job: Job) -> DeliveryResult:
        return DeliveryResult(status="failed", reason="SenderStopped", attempts=job.attempts, detail=f"{self.name} stopped")

    def _stop(self) -> None:
        self.stopped = True
        held = list(self._queue) + [job for _, _, job in self._retries]
        self._queue.clear()
        self._retries.clear()
        for job in held:
            self._finish(job, self._stopped_result(job))
        self._room.set()

    async def _send(self, payloads: list[Any], deadlines: list[float], progress: Progress | None = None
                    ) -> list[DeliveryResult]:
        """Hand ``payloads`` over (each retried until its deadline at most); their results,
        each told to ``progress`` too as soon as it is known."""
        now = self.clock()
        batch = _Batch(len(payloads), progress)
        results = batch.results
        self._sending += 1
        try:
            for index, payload in enumerate(payloads):
                refused = self._refusal(now)
                if refused is None and self.breaker is not None and not self.breaker.closed(now):
                    refused = self._open_result(0)
                if refused is not None:
                    self._count(f"failed:{refused.reason}")
                    results[index] = refused
                    batch.remaining -= 1
                    if progress is not None:
                        progress.result(index, refused)
                    continue
                while self.held >= self.max_queue and not self.stopped:  # backpressure: wait for answers
                    if self._room.is_set():
                        self._room = trio.Event()
                    await self._room.wait()
                self.held += 1
                job = Job(payload, min(deadlines[index], now + self.retry_window), batch, index, now)
                if self.stopped:
                    self._finish(job, self._stopped_result(job))
                    continue
                self._queue.append(job)
                self._queued.set()
        finally:
            self._sending -= 1
            self._check_retired()
        if batch.remaining:
            await batch.done.wait()
        return results  # type: ignore[return-value]

    # -- dispatching ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued jobs on the pool's free streams, as many as allowed now."""
        queue, pool = self._queue, self.pool
        if not queue:
            return
        allowed = self._startable()
        breaker = self.breaker
        if breaker is not None and queue:
            if not breaker.closed(self.clock()):
                self._fail_held(lambda job: self._open_result(job.attempts))
                return
            allowed = min(allowed, breaker.startable(self.clock(), len(queue)))
        started = 0
        while queue and started < allowed:
            job = queue[0]
            if not pool.try_submit(self._headers(job), self._body(job), self._callback(job)):
                break
            queue.popleft()
            job.attempts += 1
            started += 1
        if started:
            self._last_start = self.clock()
            self._started(started)
            if breaker is not None:
                breaker.started(self._last_start)

    def _callback(self, job: Job) -> Callable[[Any], None]:
        return lambda outcome: self._answer(job, outcome)

    async def _dispatcher(self) -> None:
        while True:
            self._pump()
            if not self._queue:
                await self._queued.wait()
                self._queued = trio.Event()
                continue
            if await self._hold():
                continue
            breaker = self.breaker
            if breaker is not None and breaker.state == HALF_OPEN and not breaker.startable(self.clock(), 1):
                await self._sleep_or_wake(0.05)  # the others wait for the probe's verdict
                continue
            try:
                await self.pool.wait_capacity()
            except ConnectionLost as exc:
                # The provider cannot be reached now: everything queued tries again later.
                self._defer_queued("ConnectionFailed", str(exc))

    async def _expirer(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self._queue:
                self._expire_queued()

    def _expire_overdue(self, reason: str, detail: str, waited: float = 0.0) -> None:
        """Fail the queued jobs past their deadline (that have waited in the queue more than
        ``waited`` seconds), with ``reason``."""
        now = self.clock()
        if not any(job.deadline < now and now - job.queued_at > waited for job in self._queue):
            return
        keep: deque[Job] = deque()
        for job in self._queue:
            if job.deadline < now and now - job.queued_at > waited:
                self._finish(job, DeliveryResult(status="failed", reason=reason, attempts=job.attempts, detail=detail))
            else:
                keep.append(job)
        self._queue = keep

    def _expire_queued(self) -> None:
        """No stream has been free for a while (a server allowing none): jobs past their
        deadline that have waited longer than a request may take fail instead of waiting on."""
        limit = self.pool.request_timeout
        if self.clock() - self._last_start > limit:  # else jobs are starting: the queue is only long
            self._expire_overdue("NotSent", f"no stream to {self.pool.origin} was free for {limit:g}s", limit)

    async def _sleep_or_wake(self, seconds: float) -> None:
        """Sleep, or less if a job is queued meanwhile."""
        with trio.move_on_after(max(seconds, 0.001)):
            await self._queued.wait()
        self._queued = trio.Event()

    def _defer_queued(self, reason: str, detail: str) -> None:
        """Count an attempt for every queued job and send it to the retries (one failure for
        the breaker: the connection, or the token endpoint, failed once)."""
        breaker, pool = self.breaker, self.pool
        # A pool backing off after a failed connection tells nothing new: one failure a connection.
        if breaker is not None and (reason != "ConnectionFailed" or pool.connect_failures != self._connects_seen):
            self._connects_seen = pool.connect_failures
            if breaker.failure(self.clock(), reason, connects_failed=pool.failed_in_a_row):
                self._fail_held(lambda job: self._open_result(job.attempts))
                return
        queued, self._queue = self._queue, deque()
        for job in queued:
            job.attempts += 1
            self._retry_or_fail(job, reason, None, detail, unhealthy=False)

    def _open_result(self, attempts: int) -> DeliveryResult:
        """The result of a notification the open circuit fails."""
        assert self.breaker is not None
        self.breaker.refused += 1
        return DeliveryResult(status="failed", reason="CircuitOpen", attempts=attempts,
                              detail=f"{self.name}: {self.breaker.detail(self.clock())}")

    def _fail_held(self, result: Callable[[Job], DeliveryResult]) -> None:
        """Fail every queued and retrying job (the credentials are refused)."""
        queued, self._queue = self._queue, deque()
        retries, self._retries = self._retries, []
        for job in [*queued, *(job for _, _, job in retries)]:
            self._finish(job, result(job))

    # -- answers ----------------------------------------------------------------------------

    def _answer(self, job: Job, outcome: H2Response | H2Failure) -> None:
        if type(outcome) is H2Response:
            if self.breaker is not None and outcome.status != 429 and outcome.status < 500:
                self.breaker.success()  # the provider reads and answers: it is well
            try:
                self._response(job, outcome)
            except Exception as exc:  # a bug reading an answer must not strand the job
                log.exception("%s: cannot read an answer (HTTP %d)", self.name, outcome.status)
                if job.batch.results[job.index] is None and not any(j is job for j in self._queue):
                    self._finish(job, DeliveryResult(status="failed", reason="InternalError", status_code=outcome.status,
                                                     attempts=job.attempts, detail=f"{type(exc).__name__}: {exc}"))
        elif isinstance(outcome, StreamRefused):
            self._count("refused_stream")
            job.refusals += 1
            if job.refusals <= FREE_REFUSALS:
                self._requeue(job)  # not processed by the provider: again at once
            else:  # refused again and again: back off like any failure (GOAWAY says nothing of the
                # provider's health: the connection's answers do)
                self._retry_or_fail(job, "StreamRefused", None, str(outcome), unhealthy=False)
        else:
            self._count("connection_lost")
            # A connection lost with its streams in flight is one failure for the breaker, not
            # one per stream (they share the error); a request timed out is one of its own.
            unhealthy = outcome is not self._last_lost
            self._last_lost = outcome
            self._retry_or_fail(job, "ConnectionLost", None, str(outcome), unhealthy=unhealthy)

    def _requeue(self, job: Job, *, free: bool = True) -> None:
        """Send ``job`` again at once (``free``: the attempt does not count)."""
        if free:
            job.attempts -= 1
        job.queued_at = self.clock()
        self._queue.appendleft(job)
        self._queued.set()

    def _retry_or_fail(self, job: Job, reason: str, status: int | None, detail: str | None, after: float | None = None,
                       *, unhealthy: bool = True) -> None:
        """Retry ``job`` after a backoff (at least ``after`` seconds), or fail it with ``reason``
        if that would pass its deadline or its attempts (``unhealthy``: the failure tells the
        breaker the provider is unwell; if that opens it, every held job fails)."""
        breaker = self.breaker
        if unhealthy and breaker is not None and breaker.failure(self.clock(), reason):
            self._fail_held(lambda held: self._open_result(held.attempts))
            self._finish(job, self._open_result(job.attempts))
            return
        low, high = self.jitter
        delay = min(self.backoff_max, self.backoff_min * 2 ** (max(job.attempts, 1) - 1)) * self._random.uniform(low, high)
        if after is not None:
            delay = max(delay, after)
        when = self.clock() + delay
        if job.attempts >= self.max_attempts or when > job.deadline:
            self._finish(job, DeliveryResult(status="failed", reason=reason, status_code=status, attempts=job.attempts, detail=detail))
            return
        self._count("retries")
        heapq.heappush(self._retries, (when, next(self._order), job))
        self._park(job, True)
        self._retry_added.set()

    def _park(self, job: Job, parked: bool) -> None:
        """``job`` begins or ends waiting for a retry."""
        if job.parked != parked:
            job.parked = parked
            progress = job.batch.progress
            if progress is not None:
                progress.waiting(1 if parked else -1)

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
            self._park(job, False)
            job.queued_at = self.clock()
            self._queue.append(job)
            self._queued.set()

    def _finish(self, job: Job, result: DeliveryResult) -> None:
        self._count(result.status if result.status != "failed" else f"failed:{result.reason}")
        batch = job.batch
        if job.parked:
            self._park(job, False)
        batch.results[job.index] = result
        if batch.progress is not None:
            batch.progress.result(job.index, result)
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
            "pool": self.pool.statistics().as_dict(),
            "queued": len(self._queue),
            "retrying": len(self._retries),
            "outcomes": dict(self.counts),
            "breaker": None if self.breaker is None else self.breaker.statistics(self.clock()),
        }


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound="PooledSender")


class Senders(Generic[K, S]):
    """A channel's running senders, by key: each started once, on demand, in the channel's
    nursery (`run`), and forgotten when it ends.

    Args:
        what: how errors name them (``the APNs sender``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.running: dict[K, S] = {}
        self._starting: dict[K, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def get(self, key: K, make: Callable[[], S]) -> S:
        """The sender of ``key``, started with ``make()`` if there is none (``make`` may raise
        `CredentialsError`; callers waiting for the same key then get one too)."""
        sender = self.running.get(key)
        if sender is not None:
            return sender
        starting = self._starting.get(key)
        if starting is not None:
            await starting.wait()
            sender = self.running.get(key)
            if sender is None:
                raise CredentialsError(f"{self.what} could not start")
            return sender
        starting = self._starting[key] = trio.Event()
        try:
            sender = make()
            assert self._nursery is not None, "run the channel first"
            await self._nursery.start(self._run, key, sender)
            self.running[key] = sender
            return sender
        finally:
            del self._starting[key]
            starting.set()

    async def _run(self, key: K, sender: S, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sender.run(task_status=task_status)
        except Exception:
            log.exception("%s failed", sender.name)
        finally:
            if self.running.get(key) is sender:
                del self.running[key]

    def retire(self, keys: Iterable[K]) -> None:
        """Retire the senders of ``keys`` (they finish what they hold, then stop)."""
        for key in list(keys):
            sender = self.running.pop(key, None)
            if sender is not None:
                sender.retire()
