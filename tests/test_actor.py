"""The actor runtime: bounded mailboxes, batches, stop requests, crashed requests and futures."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from server.runtime.actor import Actor, ActorStatistics, Future
from server.runtime.errors import ActorCrashed, ActorError, MailboxClosed, ResourceExhausted


class Call(msgspec.Struct, frozen=True):
    """A request that needs an answer: the actor resolves ``future``."""

    body: Any
    future: Future[Any] = msgspec.field(default_factory=Future)


class Counter(Actor):
    """Answers each `Call` with how many calls this run has handled, in batches of ``limit``."""

    def __init__(self, name: str = "counter", mailbox_size: int = 8, *, limit: int = 4) -> None:
        super().__init__(name, mailbox_size)
        self.limit = limit
        self.batches: list[list[Any]] = []
        self.handled = 0
        self.returned = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while batch := await self.receive_batch(self.limit):
            self.batches.append([m.body for m in batch])
            for message in batch:
                self.handled += 1
                message.future.set(self.handled)
        self.returned = True

    def details(self) -> dict[str, Any]:
        return {"handled": self.handled, "batches": len(self.batches)}


# -- the mailbox is bounded ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1, math.inf, math.nan])
def test_an_unbounded_or_empty_mailbox_is_refused(size: float) -> None:
    with pytest.raises(ValueError, match="must be bounded"):
        Actor("a", size)  # type: ignore[arg-type]


async def test_send_nowait_on_a_full_mailbox_raises_resource_exhausted() -> None:
    actor = Actor("tiny", 2)
    actor.send_nowait("a")
    actor.send_nowait("b")
    with pytest.raises(ResourceExhausted, match="tiny's mailbox is full") as caught:
        actor.send_nowait("c")
    assert isinstance(caught.value, ResourceExhausted)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert await actor.receive_batch(10) == ["a", "b"]


async def test_send_on_a_full_mailbox_waits_for_room(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor("tiny", 2)
    await actor.send("a")
    await actor.send("b")
    sent = trio.Event()

    async def sender() -> None:
        await actor.send("c")
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(60)
        assert not sent.is_set(), "send must wait while the mailbox is full"
        assert actor.statistics().mailbox_used == 2
        assert await actor.receive_batch() == ["a"]
        with trio.fail_after(1):
            await sent.wait()
    assert actor.statistics().mailbox_used == 2
    assert await actor.receive_batch(10) == ["b", "c"]


# -- receiving batches --------------------------------------------------------------------------


async def test_receive_batch_takes_up_to_limit_without_waiting_for_more(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor("a", 8)
    for i in range(5):
        actor.send_nowait(i)
    start = trio.current_time()
    assert await actor.receive_batch(3) == [0, 1, 2]
    assert await actor.receive_batch(10) == [3, 4]
    assert trio.current_time() == start
    actor.send_nowait(5)
    actor.send_nowait(6)
    assert await actor.receive_batch() == [5], "the default limit is one message"
    assert await actor.receive_batch() == [6]


async def test_receive_batch_waits_for_the_first_message_only(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor("a", 8)
    got: list[list[Any]] = []

    async def receiver() -> None:
        got.append(await actor.receive_batch(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.sleep(5)
        assert got == []
        actor.send_nowait("first")
    assert got == [["first"]]
    assert trio.current_time() == 5


async def test_request_stop_wakes_an_idle_receiver_with_an_empty_batch(autojump_clock: trio.abc.Clock) -> None:
    actor = Actor("a", 8)
    got: list[list[Any]] = []

    async def receiver() -> None:
        got.append(await actor.receive_batch(10))

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert not actor.stopping
            actor.request_stop()
    assert got == [[]]
    assert actor.stopping
    assert trio.current_time() == 0


async def test_after_request_stop_receive_batch_drains_the_mailbox_then_returns_empty() -> None:
    actor = Actor("a", 8)
    for i in range(3):
        await actor.send(i)
    actor.request_stop()
    assert await actor.receive_batch(2) == [0, 1]
    assert await actor.receive_batch(2) == [2]
    assert await actor.receive_batch(2) == []
    assert await actor.receive_batch(2) == []


async def test_senders_waiting_on_a_full_mailbox_are_drained_after_a_stop(nursery: trio.Nursery) -> None:
    actor = Actor("a", 1)
    actor.send_nowait(0)
    nursery.start_soon(actor.send, 1)
    await trio.testing.wait_all_tasks_blocked()
    actor.request_stop()
    assert await actor.receive_batch(10) == [0, 1]
    assert await actor.receive_batch(10) == []


async def test_sending_after_a_stop_request_raises_mailbox_closed() -> None:
    actor = Actor("closing", 8)
    actor.send_nowait("kept")
    actor.request_stop()
    with pytest.raises(MailboxClosed, match="closing is stopping"):
        await actor.send("late")
    with pytest.raises(MailboxClosed, match="closing is stopping"):
        actor.send_nowait("late")
    assert issubclass(MailboxClosed, ActorError)
    assert await actor.receive_batch(10) == ["kept"]


async def test_an_actor_run_drains_its_mailbox_and_returns_after_request_stop(nursery: trio.Nursery) -> None:
    actor = Counter(limit=2)
    await nursery.start(actor.run)
    calls = [Call(i) for i in range(5)]
    for call in calls:
        actor.send_nowait(call)
    actor.request_stop()
    with trio.fail_after(10):
        assert [await call.future.wait() for call in calls] == [1, 2, 3, 4, 5]
        while not actor.returned:
            await trio.sleep(0.001)
    assert actor.batches == [[0, 1], [2, 3], [4]]


async def test_an_idle_actor_returns_promptly_after_request_stop(autojump_clock: trio.abc.Clock) -> None:
    actor = Counter()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            assert await _ask(actor, "x") == 1
            await trio.sleep(10)
            actor.request_stop()
    assert actor.returned
    assert trio.current_time() == 10


async def test_the_base_actor_has_no_run() -> None:
    with pytest.raises(NotImplementedError):
        await Actor("a", 1).run()


# -- failing the requests held by a crashed actor -----------------------------------------------


async def test_fail_in_hand_fails_the_futures_of_the_messages_held() -> None:
    actor = Actor("holder", 8)
    answered, held, plain, queued = Call("answered"), Call("held"), "no future here", Call("queued")
    for message in (answered, held, plain, queued):
        actor.send_nowait(message)
    assert await actor.receive_batch(3) == [answered, held, plain]
    answered.future.set("done")

    actor.fail_in_hand(ValueError("disk on fire"))

    assert answered.future.result() == "done", "an answered request keeps its answer"
    with pytest.raises(ActorCrashed, match=r"holder crashed while handling the request: ValueError\('disk on fire'\)"):
        held.future.result()
    assert not queued.future.done, "a message still in the mailbox is left for the next run"
    assert await actor.receive_batch(3) == [queued]


async def test_fail_in_hand_forgets_the_batch_it_failed() -> None:
    actor = Actor("holder", 8)
    first = Call(1)
    actor.send_nowait(first)
    await actor.receive_batch()
    actor.fail_in_hand(ValueError("one"))
    actor.fail_in_hand(ValueError("two"))
    with pytest.raises(ActorCrashed, match="one"):
        first.future.result()


# -- futures ------------------------------------------------------------------------------------


async def test_a_future_is_set_once() -> None:
    future: Future[int] = Future()
    assert not future.done
    future.set(1)
    future.set(2)
    future.fail(ValueError("too late"))
    assert future.done
    assert future.result() == 1
    assert await future.wait() == 1


async def test_a_failed_future_raises_its_error_and_ignores_later_results() -> None:
    future: Future[int] = Future()
    error = ActorCrashed("gone")
    future.fail(error)
    future.set(3)
    future.fail(ValueError("second"))
    with pytest.raises(ActorCrashed) as caught:
        await future.wait()
    assert caught.value is error
    with pytest.raises(RuntimeError, match="already taken"):  # an error is taken once (below)
        future.result()


async def test_a_future_can_hold_none() -> None:
    future: Future[None] = Future()
    future.set(None)
    assert future.done
    assert await future.wait() is None


async def test_on_done_runs_each_callback_once_when_set_or_at_once_if_done() -> None:
    future: Future[str] = Future()
    seen: list[tuple[str, str]] = []
    future.on_done(lambda f: seen.append(("early-1", f.result())))
    future.on_done(lambda f: seen.append(("early-2", f.result())))
    assert seen == []
    future.set("v")
    assert seen == [("early-1", "v"), ("early-2", "v")]
    future.on_done(lambda f: seen.append(("late", f.result())))
    future.set("w")
    future.fail(ValueError("x"))
    assert seen == [("early-1", "v"), ("early-2", "v"), ("late", "v")]


async def test_on_done_sees_a_failure() -> None:
    future: Future[str] = Future()
    errors: list[BaseException | None] = []

    def callback(f: Future[str]) -> None:
        try:
            f.result()
        except ActorCrashed as exc:
            errors.append(exc)

    future.on_done(callback)
    future.fail(ActorCrashed("boom"))
    assert len(errors) == 1 and str(errors[0]) == "boom"


async def test_every_waiter_wakes_when_a_future_is_set(autojump_clock: trio.abc.Clock) -> None:
    future: Future[str] = Future()
    results: list[str] = []

    async def waiter() -> None:
        results.append(await future.wait())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(1)
        assert results == []
        future.set("ready")
    assert results == ["ready"] * 3


# -- statistics ---------------------------------------------------------------------------------


async def test_statistics_report_mailbox_use_and_details() -> None:
    actor = Counter("stats", mailbox_size=4, limit=10)
    assert actor.statistics() == ActorStatistics("stats", 0, 4, {"handled": 0, "batches": 0})
    actor.send_nowait(Call(1))
    actor.send_nowait(Call(2))
    actor.send_nowait(Call(3))
    stats = actor.statistics()
    assert (stats.name, stats.mailbox_used, stats.mailbox_size) == ("stats", 3, 4)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            await trio.testing.wait_all_tasks_blocked()
            actor.request_stop()
    assert actor.statistics() == ActorStatistics("stats", 0, 4, {"handled": 3, "batches": 1})
    with pytest.raises(AttributeError):
        stats.mailbox_used = 0  # type: ignore[misc]


def test_the_base_actor_has_no_details() -> None:
    assert Actor("plain", 3).statistics().details == {}


async def _ask(actor: Actor, body: Any) -> Any:
    call = Call(body)
    with trio.fail_after(10):
        await actor.send(call)
        return await call.future.wait()


async def test_a_failing_callback_does_not_stop_the_others_or_the_result(caplog) -> None:
    future: Future[int] = Future()
    seen = []

    def broken(f: Future[int]) -> None:
        raise RuntimeError("callback bug")

    future.on_done(broken)
    future.on_done(lambda f: seen.append(f.result()))
    future.set(7)
    assert seen == [7] and future.result() == 7
    assert "callback bug" in caplog.text


class _Refused(Exception):
    pass


async def test_a_futures_error_is_freed_once_raised_without_the_garbage_collector():
    """Raised from a future, an error's traceback held the waiter's frames, which held the
    future, which held the error: a cycle that kept whatever those frames held (a 3.8 MB
    request) until a full collection."""
    import gc
    import weakref

    future: Future[int] = Future()
    error = _Refused("no")
    seen = weakref.ref(error)
    future.fail(error)
    del error
    gc.disable()
    try:
        try:
            await future.wait()
        except _Refused:
            pass
        assert seen() is None, gc.get_referrers(seen())
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="already taken"):
        future.result()
