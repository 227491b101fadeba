"""Delivery: hands notifications to the channels and deals with what comes back.

The channels come from plugins (`pigeon_channels`); the actor starts each one's long-lived
tasks and sends it batches of `DeliveryJob` by registration platform. Every result goes back
to the caller. The sending pipeline counts them in the reports itself, in the commit that
settles the batch (`count_outcomes`), so that a crash can neither lose the counts nor count
them twice; for a caller without an outbox (``push.send``) the actor counts them, targeted
and outcome, and logs those delivered to a known profile (`DeliveryJob.profile`) in its push
log (`server.profiles.pushlog`: frequency caps count them), whether or not the caller still
waits (``count=True``). A token the provider says is dead is marked invalid on its profile
(the store keeps a registration renewed after the provider's timestamp valid). A job whose
platform no channel serves fails with ``NoChannel``: nothing is dropped silently.

Results are passed on as they come, not once a whole batch is settled: a channel that offers
``send_each(jobs, progress)`` (the APNs and FCM channels do; `server.delivery.sender.Progress`)
tells each result as soon as it is known, and `Delivery.deliver_each` hands it on (after its
dead token, if any, is marked) while the rest of the batch is still being retried; so a
batch's successes are not held back by its slowest member.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from typing import Any, Protocol, runtime_checkable

import msgspec.structs
import trio

from server.profiles import pushlog, writes
from server.profiles.store import ProfileStore
from server.runtime.actor import Actor, Future
from server.runtime.errors import ActorCrashed, ServerError
from server.reports.reporting import ReportKey, Reporting, count_outcomes, count_targeted
from server.channels import Channel, DeliveryJob, DeliveryResult
from server.delivery.sender import Mapped, Progress

__all__ = ["Delivery", "DeliveryRequest", "StreamingChannel"]

log = logging.getLogger("pigeon.delivery")


@runtime_checkable
class StreamingChannel(Protocol):
    """A channel that tells each result as soon as it is known (see the module docstring)."""

    async def send_each(self, jobs: list[DeliveryJob], progress: Progress) -> None: ...


class DeliveryRequest:
    __slots__ = ("jobs", "count", "future", "progress")

    def __init__(self, jobs: list[DeliveryJob], count: bool, progress: Progress | None = None) -> None:
        self.jobs = jobs
        self.count = count
        self.progress = progress
        self.future: Future[list[DeliveryResult]] = Future()


class _Arrivals(Progress):
    """A batch's results as the channels tell them: the ones not yet handed on, and a wake-up."""

    __slots__ = ("results", "pending", "remaining", "wake", "progress")

    def __init__(self, size: int, progress: Progress | None) -> None:
        self.results: list[DeliveryResult | None] = [None] * size
        self.pending: list[int] = []
        self.remaining = size
        self.wake = trio.Event()
        self.progress = progress

    def result(self, index: int, result: DeliveryResult) -> None:
        if self.results[index] is not None:
            log.error("a channel settled notification %d twice: the second result is ignored", index)
            return
        self.results[index] = result
        self.pending.append(index)
        self.remaining -= 1
        self.wake.set()

    def waiting(self, delta: int) -> None:
        if self.progress is not None:
            self.progress.waiting(delta)


class Delivery(Actor):
    """Runs the channels and delivers job batches through them.

    Args:
        reporting: where the results of ``count=True`` deliveries are counted.
        store: where dead tokens are marked invalid.
        channels: the channels plugins provide.
        max_concurrent: batches in delivery at once (more wait in the mailbox).
    """

    def __init__(
        self,
        reporting: Reporting,
        store: ProfileStore,
        channels: list[Channel],
        *,
        mailbox_size: int = 1024,
        max_concurrent: int = 64,
    ) -> None:
        super().__init__("delivery", mailbox_size)
        self.reporting = reporting
        self.store = store
        self.channels = channels
        self.by_platform = {platform: channel for channel in channels for platform in channel.platforms}
        self.max_concurrent = max_concurrent
        self.batches = 0
        self.jobs = 0
        self.invalidated = 0

    async def deliver(self, jobs: list[DeliveryJob], *, count: bool = False) -> list[DeliveryResult]:
        """Deliver ``jobs``; their results in the same order once every one is settled.

        Args:
            count: count each job as ``targeted`` and its outcome in the reports (in a commit
                of their own), and log the jobs delivered to a known profile in its push log,
                before answering, even if the caller stopped waiting.
        """
        request = DeliveryRequest(jobs, count)
        await self.send(request)
        return await request.future.wait()

    async def deliver_each(self, jobs: list[DeliveryJob], progress: Progress) -> None:
        """Deliver ``jobs``, telling ``progress`` each result (its dead token marked) as soon as
        it is known, and how many wait for a retry; return once every one is told."""
        request = DeliveryRequest(jobs, False, progress)
        await self.send(request)
        await request.future.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as channels:
            for channel in self.channels:
                await channels.start(channel.run)
            task_status.started()
            limiter = trio.Semaphore(self.max_concurrent)
            async with trio.open_nursery() as batches:
                while requests := await self.receive_batch(256):
                    for request in requests:
                        await limiter.acquire()
                        batches.start_soon(self._handle, request, limiter)
                    self._in_hand = []  # each task answers its own request
            channels.cancel_scope.cancel()

    async def _handle(self, request: DeliveryRequest, limiter: trio.Semaphore) -> None:
        try:
            results = await self._deliver(request.jobs, request.progress)
            if request.count:
                await self._log_pushes(request.jobs, results)
                counts: Counter[ReportKey] = Counter()
                count_targeted(counts, request.jobs)
                count_outcomes(counts, request.jobs, results)
                await self.reporting.record_counts(counts)
            request.future.set(results)
        finally:
            limiter.release()
            if not request.future.done:
                request.future.fail(ActorCrashed("delivery stopped before the notifications were settled"))

    async def _log_pushes(self, jobs: list[DeliveryJob], results: list[DeliveryResult]) -> None:
        """Log the jobs delivered to a known profile in its push log, under one id of the call
        (a profile's devices are one push)."""
        by_sandbox: dict[str, set[bytes]] = {}
        for job, result in zip(jobs, results):
            if result.status == "sent" and job.profile:
                by_sandbox.setdefault(job.app.sandbox, set()).add(job.profile)
        sender = f"push.send:{secrets.token_hex(8)}"
        for sandbox, pids in by_sandbox.items():
            try:
                await self.store.space(sandbox).write(pushlog.log_each, sorted(pids), sender)
            except ServerError as exc:  # the results stand; caps will not count these pushes
                log.error("could not log %d pushes in the push log: %s", len(pids), exc)

    async def _deliver(self, jobs: list[DeliveryJob], progress: Progress | None) -> list[DeliveryResult]:
        self.batches += 1
        self.jobs += len(jobs)
        arrivals = _Arrivals(len(jobs), progress)
        routed: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            channel = self.by_platform.get(job.platform)
            if channel is None:
                arrivals.result(index, DeliveryResult(
                    status="failed", reason="NoChannel", attempts=0, detail=f"no channel delivers to {job.platform!r}"
                ))
            else:
                routed.setdefault(channel.name, []).append(index)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hand_on, jobs, arrivals)
            for name, indexes in routed.items():
                nursery.start_soon(self._through, name, jobs, indexes, arrivals)
        return arrivals.results  # type: ignore[return-value]  # every one is set: _hand_on waited for them

    async def _through(self, name: str, jobs: list[DeliveryJob], indexes: list[int], arrivals: _Arrivals) -> None:
        """Deliver ``jobs[indexes]`` through channel ``name``; a channel's bug fails its own
        notifications (those it did not settle), not the others'."""
        channel = next(c for c in self.channels if c.name == name)
        mine = [jobs[i] for i in indexes]
        try:
            if isinstance(channel, StreamingChannel):
                await channel.send_each(mine, Mapped(arrivals, indexes))
            else:
                outcomes = await channel.send(mine)
                if len(outcomes) != len(indexes):
                    raise RuntimeError(f"returned {len(outcomes)} results for {len(indexes)} notifications")
                for i, outcome in zip(indexes, outcomes):
                    arrivals.result(i, outcome)
            missing = [i for i in indexes if arrivals.results[i] is None]
            if missing:
                raise RuntimeError(f"settled {len(indexes) - len(missing)} of {len(indexes)} notifications")
        except Exception as exc:
            log.exception("channel %s failed", name)
            failed = DeliveryResult(status="failed", reason="ChannelError", attempts=0, detail=f"channel {name}: {exc!r}")
            for i in indexes:
                if arrivals.results[i] is None:
                    arrivals.result(i, msgspec.structs.replace(failed))

    async def _hand_on(self, jobs: list[DeliveryJob], arrivals: _Arrivals) -> None:
        """Mark the dead tokens of the results that came, then tell them on; until all came."""
        while arrivals.pending or arrivals.remaining:
            if not arrivals.pending:
                await arrivals.wake.wait()
                arrivals.wake = trio.Event()
                continue
            chunk, arrivals.pending = arrivals.pending, []
            results = [arrivals.results[i] for i in chunk]
            await self._after([jobs[i] for i in chunk], results)  # type: ignore[arg-type]
            if arrivals.progress is not None:
                for i, result in zip(chunk, results):
                    arrivals.progress.result(i, result)  # type: ignore[arg-type]

    async def _after(self, jobs: list[DeliveryJob], results: list[DeliveryResult]) -> None:
        """Mark dead tokens invalid on their profiles."""
        by_sandbox: dict[str, list[tuple[DeliveryJob, DeliveryResult]]] = {}
        for job, result in zip(jobs, results):
            if result.status == "invalid":
                by_sandbox.setdefault(job.app.sandbox, []).append((job, result))
        for sandbox, dead in by_sandbox.items():
            try:
                marked = await self.store.space(sandbox).write(
                    writes.invalidate_tokens,
                    [(job.app.app, job.token, result.reason or "Invalid", result.invalid_since_us) for job, result in dead],
                )
            except ServerError as exc:  # the results stand; only the profiles could not be updated
                log.error("could not mark %d dead tokens invalid: %s", len(dead), exc)
                marked = ["unknown"] * len(dead)
            for (_, result), what in zip(dead, marked):
                if what == "kept":
                    result.status = "failed"
                    result.detail = "the token was registered again after the provider's timestamp: it stays valid"
            self.invalidated += marked.count("marked")

    def details(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "notifications": self.jobs,
            "tokens_invalidated": self.invalidated,
            "channels": {channel.name: channel.statistics() for channel in self.channels},
        }
