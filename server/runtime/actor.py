"""Actors: tasks with a bounded mailbox, started with ``nursery.start``.

An `Actor` owns its mailbox for its whole life, so senders keep working while the supervisor
restarts a crashed ``run``. Messages that need an answer carry a `Future`; the actor resolves
it, or fails it with `ActorCrashed` when it dies holding it, so no caller waits forever.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import msgspec
import trio

from server.runtime.errors import ActorCrashed, MailboxClosed, ResourceExhausted

__all__ = ["Actor", "Future", "ActorStatistics"]

T = TypeVar("T")
_UNSET: Any = object()
log = logging.getLogger("pigeon.actor")


#: What a future holds once its error was raised (`Future.result`).
_TAKEN = RuntimeError("taken")


class Future(Generic[T]):
    """A one-shot result slot, resolved once by the actor and awaited by the caller.

    ``on_done`` callbacks run synchronously, in the actor's task, when the result is set.
    """

    __slots__ = ("_event", "_value", "_error", "_callbacks")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: T = _UNSET
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def failed(self) -> bool:
        """Whether the future was failed (without taking its error, which `result` does)."""
        return self.done and self._error is not None

    def set(self, value: T) -> None:
        if not self.done:
            self._value = value
            self._finish()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._finish()

    def _finish(self) -> None:
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                # A callback's failure is its own: the result stands and the others still run.
                log.exception("a callback of a future failed")

    def on_done(self, callback: Callable[[Future[T]], None]) -> None:
        if self.done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def result(self) -> T:
        """The value, or raise the error (once: see below)."""
        if not self.done:
            raise RuntimeError("the future has no result yet")
        error = self._error
        if error is not None:
            # Raised, the error's traceback holds the frames of whoever waited, and they hold
            # this future: a cycle that only a full garbage collection breaks, with all those
            # frames hold (a refused 3.8 MB profiles.patch kept 7.5 MB alive per call). So the
            # future lets go of its error as it raises it: an error is taken once.
            self._error = _TAKEN
            if error is _TAKEN:
                raise RuntimeError("the error of this future was already taken")
            try:
                raise error
            finally:
                del error  # this frame, in the traceback, must not hold it either
        return self._value

    async def wait(self) -> T:
        await self._event.wait()
        return self.result()


class ActorStatistics(msgspec.Struct, frozen=True):
    name: str
    mailbox_used: int
    mailbox_size: int
    details: dict[str, Any]


class Actor:
    """Base of Pigeon's actors.

    Subclasses implement ``run(*, task_status)``: set up, call ``task_status.started()`` once
    ready, then loop on `receive_batch` until it returns an empty list (a stop was requested
    and the mailbox is drained), and return.

    Args:
        name: the actor's name in logs and stats.
        mailbox_size: messages the mailbox holds before senders wait (backpressure).
    """

    def __init__(self, name: str, mailbox_size: int) -> None:
        if not 0 < mailbox_size < math.inf:
            raise ValueError("an actor's mailbox must be bounded")
        self.name = name
        self._send, self._receive = trio.open_memory_channel[Any](mailbox_size)
        self._stopping = False
        self._idle_scope: trio.CancelScope | None = None
        #: Messages taken from the mailbox and not yet finished; failed if ``run`` crashes.
        self._in_hand: list[Any] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    # -- senders' side ----------------------------------------------------------------------

    async def send(self, message: Any) -> None:
        """Put a message in the mailbox, waiting while it is full."""
        if self._stopping:
            raise MailboxClosed(f"{self.name} is stopping")
        try:
            await self._send.send(message)
        except trio.ClosedResourceError:
            raise MailboxClosed(f"{self.name} has stopped") from None

    def send_nowait(self, message: Any) -> None:
        """Put a message in the mailbox or raise `ResourceExhausted` if it is full."""
        if self._stopping:
            raise MailboxClosed(f"{self.name} is stopping")
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise ResourceExhausted(f"{self.name}'s mailbox is full") from None
        except trio.ClosedResourceError:
            raise MailboxClosed(f"{self.name} has stopped") from None

    # -- the actor's side -------------------------------------------------------------------

    async def receive_batch(self, limit: int = 1) -> list[Any]:
        """Wait for a message, then take up to ``limit`` without waiting further.

        Returns an empty list once a stop was requested and the mailbox is empty.
        """
        batch: list[Any] = []
        if not self._stopping:
            with trio.CancelScope() as scope:
                self._idle_scope = scope
                batch.append(await self._receive.receive())
            self._idle_scope = None
        while len(batch) < limit:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self._in_hand = batch
        return batch

    def fail_in_hand(self, error: BaseException) -> None:
        """Fail the futures of messages this actor held when it crashed."""
        for message in self._in_hand:
            for future in _futures_of(message):
                # one exception per caller: a shared one would collect every caller's traceback
                future.fail(ActorCrashed(f"{self.name} crashed while handling the request: {error!r}"))
        self._in_hand = []

    def close(self) -> None:
        """Refuse new messages and fail every request still held or queued.

        The supervisor calls this once the actor has ended for good (stopped, cancelled after
        the grace time, not restarted, or given up on), so that no caller waits forever.
        """
        self._stopping = True
        self._send.close()  # senders waiting on a full mailbox get MailboxClosed
        for message in self._in_hand:
            for future in _futures_of(message):
                future.fail(ActorCrashed(f"{self.name} stopped while handling the request"))
        self._in_hand = []
        while True:
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            for future in _futures_of(message):
                future.fail(MailboxClosed(f"{self.name} stopped before handling the request"))

    def request_stop(self) -> None:
        """Ask the actor to finish what its mailbox holds and return from ``run``."""
        self._stopping = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def statistics(self) -> ActorStatistics:
        stats = self._receive.statistics()
        return ActorStatistics(
            name=self.name,
            mailbox_used=stats.current_buffer_used,
            mailbox_size=int(stats.max_buffer_size),
            details=self.details(),
        )

    def details(self) -> dict[str, Any]:
        """Actor-specific counters for ``server.stats``."""
        return {}


def _futures_of(message: Any) -> Iterable[Future[Any]]:
    future = getattr(message, "future", None)
    return (future,) if isinstance(future, Future) else ()
