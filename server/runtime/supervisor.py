"""A one-for-one supervisor with OTP restart intensity and Akka-style backoff.

Children start in order, each with ``nursery.start``, so the supervisor reports ready only once
every child is ready; they stop in reverse order. A crashed child is restarted after a jittered
exponential backoff that resets after a healthy run. More than ``intensity`` crashes within
``period`` seconds raise `RestartIntensityExceeded`, which cancels the siblings and escalates
to the parent. A child that fails before it is first ready fails the supervisor's start.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque

import msgspec
import trio

from server.runtime.actor import Actor
from server.runtime.errors import RestartIntensityExceeded

__all__ = ["Restart", "ChildSpec", "SupervisorOptions", "Supervisor", "ChildStatistics"]

log = logging.getLogger("pigeon.supervisor")


class Restart(enum.Enum):
    #: Always restarted, even after a normal return.
    PERMANENT = "permanent"
    #: Restarted only after a crash.
    TRANSIENT = "transient"
    #: Never restarted.
    TEMPORARY = "temporary"


class ChildSpec(msgspec.Struct, frozen=True):
    actor: Actor
    restart: Restart = Restart.PERMANENT

    @property
    def id(self) -> str:
        return self.actor.name


class SupervisorOptions(msgspec.Struct, frozen=True, kw_only=True):
    #: Restarts allowed within ``period`` seconds, counted across all children (OTP's MaxR
    #: and MaxT), before the supervisor gives up and escalates.
    intensity: int = 5
    period: float = 10.0
    backoff_min: float = 0.05
    backoff_max: float = 5.0
    #: Each delay is multiplied by a random factor in [1 - jitter, 1 + jitter].
    jitter: float = 0.2
    #: A run this long (seconds) resets the backoff to ``backoff_min``.
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if self.intensity < 0 or self.period <= 0:
            raise ValueError("intensity must be >= 0 and period > 0")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("backoff_min must be > 0 and <= backoff_max")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


class ChildStatistics(msgspec.Struct, frozen=True):
    name: str
    state: str
    restarts: int
    crashes: int
    last_error: str | None


class _Child:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.state = "starting"
        self.restarts = 0
        self.crashes = 0
        self.last_error: str | None = None
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        #: Whether its supervising task began; `stop` does not wait for one that never will.
        self.entered = False


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Supervisor:
    """Runs ``children`` one-for-one.

    Args:
        name: for logs.
        children: started in this order, stopped in the reverse order.
        options: restart intensity and backoff.
    """

    def __init__(self, name: str, children: list[ChildSpec], options: SupervisorOptions | None = None) -> None:
        self.name = name
        self.options = options or SupervisorOptions()
        self._children = [_Child(spec) for spec in children]
        self._stopping = False
        self._random = random.Random()
        #: Times of recent crashes of any child: the restart intensity window.
        self._crash_times: deque[float] = deque()

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every child, report ready, and supervise until `stop` completes."""
        async with trio.open_nursery() as nursery:
            for child in self._children:
                if self._stopping:
                    break
                await nursery.start(self._supervise, child)
            log.info("%s: %d actors running", self.name, len(self._children))
            task_status.started(self)

    async def stop(self, grace: float) -> None:
        """Stop the children in reverse order within ``grace`` seconds overall (each still gets
        at least half a second, so one stuck child cannot rob the next of its final work);
        a child still running at its deadline is cancelled."""
        self._stopping = True
        deadline = trio.current_time() + grace
        floor = min(grace, 0.5)
        for child in reversed(self._children):
            if not child.entered:  # never started, and `run` starts no child once stopping
                child.state = "stopped"
                child.spec.actor.close()
                child.finished.set()
                continue
            child.spec.actor.request_stop()
            with trio.move_on_at(max(deadline, trio.current_time() + floor)) as waited:
                await child.finished.wait()
            if waited.cancelled_caught:
                log.warning("%s: %s did not stop within %gs; cancelling it", self.name, child.spec.id, grace)
                child.scope.cancel()
                await child.finished.wait()

    def statistics(self) -> list[ChildStatistics]:
        return [
            ChildStatistics(c.spec.id, c.state, c.restarts, c.crashes, c.last_error) for c in self._children
        ]

    def actors(self) -> list[Actor]:
        return [c.spec.actor for c in self._children]

    async def _supervise(self, child: _Child, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        spec, options = child.spec, self.options
        actor = spec.actor
        crash_times = self._crash_times
        backoff = options.backoff_min
        first = True
        child.entered = True
        try:
            with child.scope:
                while True:
                    started_at = trio.current_time()
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(actor.run)
                            child.state = "running"
                            if first:
                                first = False
                                task_status.started()
                        if self._stopping or actor.stopping or spec.restart is not Restart.PERMANENT:
                            child.state = "stopped"
                            return
                        raise RuntimeError(f"{spec.id} returned without being asked to stop")
                    except Exception as exc:
                        error = _unwrap(exc)
                        actor.fail_in_hand(error)
                        child.last_error = repr(error)
                        if first:
                            child.state = "failed"
                            raise
                        now = trio.current_time()
                        child.crashes += 1
                        if now - started_at >= options.reset_after:
                            backoff = options.backoff_min
                        crash_times.append(now)
                        while crash_times and crash_times[0] < now - options.period:
                            crash_times.popleft()
                        if spec.restart is Restart.TEMPORARY:
                            # OTP: a temporary child is never restarted, and its end is no failure
                            child.state = "failed"
                            log.error("%s: %s crashed and is temporary: not restarted", self.name, spec.id, exc_info=error)
                            return
                        if len(crash_times) > options.intensity:
                            child.state = "failed"
                            log.error("%s: %s crashed, giving up", self.name, spec.id, exc_info=error)
                            raise RestartIntensityExceeded(spec.id, len(crash_times), options.period, error) from exc
                        delay = backoff * self._random.uniform(1 - options.jitter, 1 + options.jitter)
                        backoff = min(backoff * 2, options.backoff_max)
                        child.state = "restarting"
                        log.error(
                            "%s: %s crashed (%d within %gs); restarting in %.2fs",
                            self.name, spec.id, len(crash_times), options.period, delay, exc_info=error,
                        )
                        await trio.sleep(delay)
                        child.restarts += 1
            # Only reached when `stop` cancelled the child's scope.
            if first:  # cancelled before it was ready: let `run` go on
                task_status.started()
        finally:
            if child.state not in ("stopped", "failed"):
                child.state = "stopped"
            actor.close()
            child.finished.set()
