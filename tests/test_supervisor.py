"""The one-for-one supervisor: start order, restarts, backoff, intensity, restart types, stop.

Everything time-based runs under ``autojump_clock``, so backoff sleeps and grace times take no
real time and ``trio.current_time()`` measures them exactly.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from server.runtime.actor import Actor, Future
from server.runtime.errors import ActorCrashed, ActorError, MailboxClosed, RestartIntensityExceeded
from server.runtime.supervisor import ChildSpec, ChildStatistics, Restart, Supervisor, SupervisorOptions

#: Options for tests that do not look at the backoff: no jitter, small delays, lenient intensity.
CALM = SupervisorOptions(intensity=10, period=10.0, backoff_min=0.5, backoff_max=4.0, jitter=0.0)


class Call(msgspec.Struct, frozen=True):
    body: Any
    future: Future[Any] = msgspec.field(default_factory=Future)


class Worker(Actor):
    """Answers each call with the number of calls this *run* has handled (run-local state).

    Bodies ``"crash"``, ``"hang"`` and ``"return"`` make it raise, block forever, or return
    without a stop request. ``exits`` records how each run ended: ``"returned"`` or the type
    of the exception that ended it (``"Cancelled"``, ``"ValueError"``).
    """

    def __init__(
        self,
        name: str,
        journal: list[str] | None = None,
        *,
        start_delay: float = 0.0,
        handle_delay: float = 0.0,
        fail_start: str | None = None,
        limit: int = 8,
        mailbox_size: int = 16,
    ) -> None:
        super().__init__(name, mailbox_size)
        self.journal = journal if journal is not None else []
        self.start_delay = start_delay
        self.handle_delay = handle_delay
        self.fail_start = fail_start
        self.limit = limit
        self.runs = 0
        self.exits: list[str] = []
        #: Actors whose ``stopping`` this one reports in the journal when it returns.
        self.peers: list[Actor] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        self.journal.append(f"start {self.name}")
        if self.start_delay:
            await trio.sleep(self.start_delay)
        if self.fail_start == "raise":
            raise ValueError(f"{self.name} cannot start")
        if self.fail_start == "return":
            return
        task_status.started()
        self.journal.append(f"ready {self.name}")
        try:
            await self._serve()
        except BaseException as exc:
            self.exits.append(type(exc).__name__)
            raise
        self.exits.append("returned")
        seen = "".join(peer.name for peer in self.peers if peer.stopping)
        self.journal.append(f"stopped {self.name}" + (f" (stopping: {seen})" if self.peers else ""))

    async def _serve(self) -> None:
        handled = 0
        while batch := await self.receive_batch(self.limit):
            for message in batch:
                if message.body == "crash":
                    raise ValueError(f"{self.name} was told to crash")
                if message.body == "hang":
                    await trio.sleep_forever()
                if message.body == "return":
                    message.future.set("bye")
                    return
                await trio.sleep(self.handle_delay)
                handled += 1
                message.future.set(handled)


class Flaky(Actor):
    """Run ``i`` lasts ``lifetimes[i]`` seconds after it is ready, then crashes; later runs serve
    normally. ``starts`` records when each run began, so the backoff is ``starts[i + 1] -
    (starts[i] + lifetimes[i])``."""

    def __init__(self, name: str, lifetimes: list[float]) -> None:
        super().__init__(name, 4)
        self.lifetimes = lifetimes
        self.starts: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        task_status.started()
        run = len(self.starts) - 1
        if run < len(self.lifetimes):
            await trio.sleep(self.lifetimes[run])
            raise ValueError(f"{self.name} crash #{run + 1}")
        while await self.receive_batch():
            pass

    def delays(self) -> list[float]:
        return [self.starts[i + 1] - (self.starts[i] + life) for i, life in enumerate(self.lifetimes)]


#: Long enough for any test here, but finite, so that a caller left hanging fails the test (under
#: ``autojump_clock`` a deadlock jumps straight to the deadline) instead of blocking the run.
PATIENCE = 10_000


async def answer(future: Future[Any]) -> Any:
    with trio.fail_after(PATIENCE):
        return await future.wait()


async def ask(actor: Actor, body: Any) -> Any:
    call = Call(body)
    with trio.fail_after(PATIENCE):
        await actor.send(call)
    return await answer(call.future)


async def wait_for_escalation() -> None:
    await trio.sleep(PATIENCE)
    pytest.fail("the supervisor did not escalate")


def stats(supervisor: Supervisor) -> dict[str, ChildStatistics]:
    return {s.name: s for s in supervisor.statistics()}


# -- starting -----------------------------------------------------------------------------------


async def test_children_start_in_order_and_the_supervisor_is_ready_only_when_all_are(
    autojump_clock: trio.abc.Clock,
) -> None:
    journal: list[str] = []
    a = Worker("a", journal, start_delay=1)
    b = Worker("b", journal, start_delay=2)
    c = Worker("c", journal)
    supervisor = Supervisor("root", [ChildSpec(a), ChildSpec(b), ChildSpec(c)], CALM)
    assert [s.state for s in supervisor.statistics()] == ["starting"] * 3

    async with trio.open_nursery() as nursery:
        started = await nursery.start(supervisor.run)
        assert started is supervisor
        assert trio.current_time() == 3, "children start one after the other"
        assert journal == ["start a", "ready a", "start b", "ready b", "start c", "ready c"]
        assert supervisor.statistics() == [
            ChildStatistics(name, "running", 0, 0, None) for name in ("a", "b", "c")
        ]
        assert supervisor.actors() == [a, b, c]
        assert {name: c.state for name, c in stats(supervisor).items()} == {"a": "running", "b": "running", "c": "running"}
        await supervisor.stop(1)
    assert {name: c.state for name, c in stats(supervisor).items()} == {"a": "stopped", "b": "stopped", "c": "stopped"}


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("raise", ValueError("b cannot start")),
        ("return", RuntimeError("child exited without calling task_status.started()")),
    ],
)
async def test_a_child_failing_before_it_is_ready_fails_the_start(
    autojump_clock: trio.abc.Clock, how: str, error: Exception
) -> None:
    journal: list[str] = []
    a, b, c = Worker("a", journal), Worker("b", journal, start_delay=1, fail_start=how), Worker("c", journal)
    supervisor = Supervisor("root", [ChildSpec(a), ChildSpec(b), ChildSpec(c)], CALM)

    with pytest.RaisesGroup(pytest.RaisesExc(type(error), match=re.escape(str(error))), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            pytest.fail("the supervisor reported ready although b failed to start")

    assert b.runs == 1, "a child that never started is not restarted"
    assert a.exits == ["Cancelled"], "the children already started are cancelled"
    assert c.runs == 0, "the children after the failed one never start"
    assert journal == ["start a", "ready a", "start b"]
    by_name = stats(supervisor)
    assert by_name["b"].state == "failed"
    assert by_name["b"].crashes == 0 and by_name["b"].restarts == 0
    assert by_name["b"].last_error == repr(error)
    assert by_name["a"].state == "stopped"
    assert by_name["c"].state == "starting"


# -- one-for-one restarts -----------------------------------------------------------------------


async def test_a_crashed_child_is_restarted_and_its_siblings_are_undisturbed(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    before, crasher, after = Worker("before"), Worker("crasher"), Worker("after")
    supervisor = Supervisor("root", [ChildSpec(before), ChildSpec(crasher), ChildSpec(after)], CALM)
    await nursery.start(supervisor.run)
    assert [await ask(before, "x"), await ask(before, "x")] == [1, 2]
    assert await ask(after, "x") == 1
    assert await ask(crasher, "x") == 1

    with pytest.raises(ActorCrashed, match="crasher crashed while handling the request"):
        await ask(crasher, "crash")
    crashed_at = trio.current_time()
    # Sent during the backoff: it waits in the mailbox and the new run answers it.
    assert await ask(crasher, "x") == 1, "the restarted run starts with fresh state"
    assert trio.current_time() - crashed_at == pytest.approx(CALM.backoff_min)

    assert crasher.runs == 2 and crasher.exits == ["ValueError"]
    assert before.runs == after.runs == 1, "one-for-one: the siblings are not restarted"
    assert before.exits == after.exits == []
    assert await ask(before, "x") == 3, "a sibling keeps its run's state"
    assert await ask(after, "x") == 2
    by_name = stats(supervisor)
    assert by_name["crasher"] == ChildStatistics(
        "crasher", "running", 1, 1, "ValueError('crasher was told to crash')"
    )
    assert by_name["before"] == ChildStatistics("before", "running", 0, 0, None)
    assert by_name["after"] == ChildStatistics("after", "running", 0, 0, None)
    await supervisor.stop(1)


async def test_every_request_held_by_a_crashing_child_fails_and_queued_ones_survive(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    worker = Worker("w", limit=3)
    supervisor = Supervisor("root", [ChildSpec(worker)], CALM)
    await nursery.start(supervisor.run)
    calls = [Call(body) for body in ("ok", "crash", "held", "queued")]
    for call in calls:
        worker.send_nowait(call)  # all in the mailbox before the worker wakes: batch = first 3
    ok, crash, held, queued = calls

    assert await answer(ok.future) == 1, "a request answered before the crash keeps its answer"
    for call in (crash, held):
        with pytest.raises(ActorCrashed, match=r"w crashed .*ValueError\('w was told to crash'\)"):
            await answer(call.future)
    assert await answer(queued.future) == 1, "a request still in the mailbox goes to the next run"
    assert worker.runs == 2
    await supervisor.stop(1)


async def test_a_transient_child_is_restarted_after_a_crash(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    worker = Worker("t")
    supervisor = Supervisor("root", [ChildSpec(worker, Restart.TRANSIENT)], CALM)
    await nursery.start(supervisor.run)
    with pytest.raises(ActorCrashed):
        await ask(worker, "crash")
    assert await ask(worker, "x") == 1
    assert worker.runs == 2
    assert stats(supervisor)["t"].state == "running"
    await supervisor.stop(1)


@pytest.mark.parametrize("restart", [Restart.TRANSIENT, Restart.TEMPORARY])
async def test_a_transient_or_temporary_child_that_returns_is_not_restarted(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, restart: Restart
) -> None:
    worker, sibling = Worker("w"), Worker("sibling")
    supervisor = Supervisor("root", [ChildSpec(worker, restart), ChildSpec(sibling)], CALM)
    await nursery.start(supervisor.run)
    assert await ask(worker, "return") == "bye"
    await trio.sleep(100)
    assert worker.runs == 1
    assert stats(supervisor)["w"] == ChildStatistics("w", "stopped", 0, 0, None)
    assert await ask(sibling, "x") == 1, "the siblings keep running"
    await supervisor.stop(1)
    assert stats(supervisor)["sibling"].state == "stopped"


async def test_a_permanent_child_returning_without_a_stop_request_counts_as_a_crash(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    worker = Worker("p")
    supervisor = Supervisor("root", [ChildSpec(worker, Restart.PERMANENT)], CALM)
    await nursery.start(supervisor.run)
    assert await ask(worker, "return") == "bye"
    assert await ask(worker, "x") == 1
    assert worker.runs == 2 and worker.exits == ["returned"]
    assert stats(supervisor)["p"] == ChildStatistics(
        "p", "running", 1, 1, "RuntimeError('p returned without being asked to stop')"
    )
    await supervisor.stop(1)


async def test_a_temporary_child_that_crashes_is_dropped_without_escalating(
    autojump_clock: trio.abc.Clock,
) -> None:
    """OTP: a temporary child is never restarted and its crash is not the supervisor's failure."""
    worker, sibling = Worker("temp"), Worker("sibling")
    supervisor = Supervisor("root", [ChildSpec(sibling), ChildSpec(worker, Restart.TEMPORARY)], CALM)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        with pytest.raises(ActorCrashed):
            await ask(worker, "crash")
        await trio.sleep(1)
        assert worker.runs == 1
        assert stats(supervisor)["temp"] == ChildStatistics(
            "temp", "failed", 0, 1, "ValueError('temp was told to crash')"
        )
        with pytest.raises(MailboxClosed):  # nobody will ever answer it
            await worker.send(Call("x"))
        assert await ask(sibling, "x") == 1  # the sibling is untouched
        await supervisor.stop(1)
    assert sibling.exits == ["returned"]


# -- backoff ------------------------------------------------------------------------------------


async def test_the_backoff_doubles_from_min_and_is_capped_at_max(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    flaky = Flaky("flaky", [0.0] * 6)
    options = SupervisorOptions(intensity=100, period=1000, backoff_min=1, backoff_max=8, jitter=0, reset_after=1000)
    supervisor = Supervisor("root", [ChildSpec(flaky)], options)
    await nursery.start(supervisor.run)
    await trio.sleep(1000)
    assert flaky.delays() == pytest.approx([1, 2, 4, 8, 8, 8])
    assert stats(supervisor)["flaky"] == ChildStatistics("flaky", "running", 6, 6, "ValueError('flaky crash #6')")
    await supervisor.stop(1)


async def test_the_backoff_is_jittered_within_its_bounds(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    crashes = 12
    flaky = Flaky("flaky", [0.0] * crashes)
    options = SupervisorOptions(intensity=100, period=1000, backoff_min=1, backoff_max=16, jitter=0.25)
    supervisor = Supervisor("root", [ChildSpec(flaky)], options)
    await nursery.start(supervisor.run)
    await trio.sleep(1000)
    delays = flaky.delays()
    nominal = [min(1 * 2**k, 16) for k in range(crashes)]
    for delay, base in zip(delays, nominal, strict=True):
        assert base * 0.75 - 1e-9 <= delay <= base * 1.25 + 1e-9
    assert delays != pytest.approx(nominal), "the delays are jittered"
    # Below the cap, the bounds do not overlap: every delay is longer than the one before.
    assert delays[:5] == sorted(delays[:5])
    await supervisor.stop(1)


async def test_a_healthy_run_resets_the_backoff(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    # Runs 3 (5 s) is shorter than reset_after and keeps the backoff; run 4 (10 s) resets it.
    flaky = Flaky("flaky", [0, 0, 5, 10, 0, 0])
    options = SupervisorOptions(intensity=100, period=1000, backoff_min=1, backoff_max=100, jitter=0, reset_after=10)
    supervisor = Supervisor("root", [ChildSpec(flaky)], options)
    await nursery.start(supervisor.run)
    await trio.sleep(1000)
    assert flaky.delays() == pytest.approx([1, 2, 4, 1, 2, 4])
    await supervisor.stop(1)


# -- restart intensity --------------------------------------------------------------------------


@pytest.mark.parametrize("intensity", [0, 1, 3])
async def test_too_many_crashes_within_the_period_escalate_and_cancel_the_siblings(
    autojump_clock: trio.abc.Clock, intensity: int
) -> None:
    before, after = Worker("before"), Worker("after")
    crasher = Flaky("crasher", [0.0] * 100)
    options = SupervisorOptions(intensity=intensity, period=10, backoff_min=0.05, backoff_max=1)
    supervisor = Supervisor("root", [ChildSpec(before), ChildSpec(crasher), ChildSpec(after)], options)
    with pytest.RaisesGroup(
        pytest.RaisesExc(
            RestartIntensityExceeded,
            match=rf"{intensity + 1} crashes within 10s, the last in actor 'crasher': ValueError",
            check=lambda exc: exc.child == "crasher",
        ),
        flatten_subgroups=True,
    ) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await wait_for_escalation()

    assert len(crasher.starts) == intensity + 1, "OTP: more than `intensity` restarts escalate"
    assert before.exits == ["Cancelled"] and after.exits == ["Cancelled"]
    assert before.runs == after.runs == 1
    escalated = caught.value.exceptions[0]
    while isinstance(escalated, BaseExceptionGroup):
        escalated = escalated.exceptions[0]
    assert isinstance(escalated, ActorError)
    assert escalated.__cause__ is not None, "the crash that escalated is chained"
    by_name = stats(supervisor)
    assert by_name["crasher"] == ChildStatistics(
        "crasher", "failed", intensity, intensity + 1, f"ValueError('crasher crash #{intensity + 1}')"
    )
    assert by_name["before"].state == by_name["after"].state == "stopped"


async def test_crashes_spread_over_more_than_the_period_do_not_escalate(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    flaky = Flaky("flaky", [6.0] * 5)  # one crash every 6 s or more, period 5 s
    options = SupervisorOptions(intensity=1, period=5, backoff_min=0.05, backoff_max=1)
    supervisor = Supervisor("root", [ChildSpec(flaky)], options)
    await nursery.start(supervisor.run)
    await trio.sleep(100)
    assert len(flaky.starts) == 6
    assert stats(supervisor)["flaky"] == ChildStatistics("flaky", "running", 5, 5, "ValueError('flaky crash #5')")
    await supervisor.stop(1)


async def test_two_crashes_within_the_period_escalate_with_intensity_one(autojump_clock: trio.abc.Clock) -> None:
    flaky = Flaky("flaky", [2.0] * 5)
    options = SupervisorOptions(intensity=1, period=5, backoff_min=0.05, backoff_max=1, jitter=0)
    supervisor = Supervisor("root", [ChildSpec(flaky)], options)
    with pytest.RaisesGroup(RestartIntensityExceeded, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await wait_for_escalation()
    assert len(flaky.starts) == 2
    assert trio.current_time() == pytest.approx(4.05)


# -- stopping -----------------------------------------------------------------------------------


async def test_stop_stops_the_children_in_reverse_order(autojump_clock: trio.abc.Clock) -> None:
    journal: list[str] = []
    workers = [Worker(name, journal) for name in ("a", "b", "c")]
    for w in workers:
        w.peers = workers
    supervisor = Supervisor("root", [ChildSpec(w) for w in workers], CALM)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.stop(5)
    # Each child is asked to stop only once the one after it has returned.
    assert [line for line in journal if line.startswith("stopped")] == [
        "stopped c (stopping: c)",
        "stopped b (stopping: bc)",
        "stopped a (stopping: abc)",
    ]
    assert all(w.exits == ["returned"] and w.runs == 1 for w in workers)
    assert trio.current_time() == 0, "idle children stop at once"
    assert supervisor.statistics() == [ChildStatistics(n, "stopped", 0, 0, None) for n in ("a", "b", "c")]


async def test_stop_lets_a_child_drain_its_mailbox_and_refuses_new_messages(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    worker = Worker("w", handle_delay=1, limit=2)
    supervisor = Supervisor("root", [ChildSpec(worker)], CALM)
    await nursery.start(supervisor.run)
    calls = [Call(i) for i in range(5)]
    for call in calls:
        worker.send_nowait(call)
    start = trio.current_time()
    async with trio.open_nursery() as stopping:
        stopping.start_soon(supervisor.stop, 10)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(MailboxClosed):
            await worker.send(Call("late"))
    assert trio.current_time() - start == 5
    assert [call.future.result() for call in calls] == [1, 2, 3, 4, 5]
    assert worker.exits == ["returned"]
    assert stats(supervisor)["w"].state == "stopped"


async def test_stop_cancels_a_child_that_does_not_stop_within_grace(autojump_clock: trio.abc.Clock) -> None:
    journal: list[str] = []
    first, stuck = Worker("first", journal), Worker("stuck", journal)
    supervisor = Supervisor("root", [ChildSpec(first), ChildSpec(stuck)], CALM)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        stuck.send_nowait(Call("hang"))
        await trio.testing.wait_all_tasks_blocked()
        await supervisor.stop(2)
        assert trio.current_time() == 2
    assert stuck.exits == ["Cancelled"]
    assert first.exits == ["returned"], "the next child is still stopped gracefully"
    assert journal[-1] == "stopped first"
    assert supervisor.statistics() == [
        ChildStatistics("first", "stopped", 0, 0, None),
        ChildStatistics("stuck", "stopped", 0, 0, None),
    ]


async def test_a_child_crashing_while_it_drains_is_restarted_to_finish_its_mailbox(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    worker = Worker("w", limit=1)
    supervisor = Supervisor("root", [ChildSpec(worker)], CALM)
    await nursery.start(supervisor.run)
    crash, rest = Call("crash"), Call("rest")
    worker.send_nowait(crash)
    worker.send_nowait(rest)
    await supervisor.stop(5)
    with pytest.raises(ActorCrashed):
        crash.future.result()
    assert rest.future.result() == 1
    assert worker.runs == 2 and worker.exits == ["ValueError", "returned"]
    assert stats(supervisor)["w"].state == "stopped"


async def test_stop_during_a_backoff_within_grace(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    worker = Worker("w")
    options = SupervisorOptions(intensity=10, period=100, backoff_min=10, backoff_max=10, jitter=0)
    supervisor = Supervisor("root", [ChildSpec(worker)], options)
    await nursery.start(supervisor.run)
    with pytest.raises(ActorCrashed):
        await ask(worker, "crash")
    assert stats(supervisor)["w"].state == "restarting"
    assert stats(supervisor)["w"] == ChildStatistics("w", "restarting", 0, 1, "ValueError('w was told to crash')")
    start = trio.current_time()
    await supervisor.stop(1)
    assert trio.current_time() - start == 1
    assert stats(supervisor)["w"].state == "stopped"
    assert worker.runs == 1


# -- bugs: these tests fail until the supervisor is fixed ---------------------------------------


async def test_requests_of_a_child_cancelled_after_grace_do_not_hang(autojump_clock: trio.abc.Clock) -> None:
    """BUG: the futures held by (and queued for) a child that stop() cancels are never failed."""
    worker = Worker("stuck", limit=1)
    supervisor = Supervisor("root", [ChildSpec(worker)], CALM)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        held, queued = Call("hang"), Call("queued")
        worker.send_nowait(held)
        worker.send_nowait(queued)
        await trio.testing.wait_all_tasks_blocked()
        await supervisor.stop(1)
    assert worker.exits == ["Cancelled"]
    for call in (held, queued):
        assert call.future.done, f"the caller of {call.body!r} would wait forever"
        with pytest.raises(ActorError):
            call.future.result()


async def test_a_child_that_finished_for_good_refuses_messages(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """BUG: a TRANSIENT child that returned is "stopped", yet its mailbox still takes requests
    that nobody will ever answer."""
    worker = Worker("t")
    supervisor = Supervisor("root", [ChildSpec(worker, Restart.TRANSIENT)], CALM)
    await nursery.start(supervisor.run)
    assert await ask(worker, "return") == "bye"
    await trio.testing.wait_all_tasks_blocked()
    assert stats(supervisor)["t"].state == "stopped"
    with pytest.raises(MailboxClosed):
        worker.send_nowait(Call("x"))


async def test_stop_after_a_failed_start_returns(autojump_clock: trio.abc.Clock) -> None:
    """BUG: stop() waits forever for a child whose supervising task never started."""
    a, b, c = Worker("a"), Worker("b", fail_start="raise"), Worker("c")
    supervisor = Supervisor("root", [ChildSpec(a), ChildSpec(b), ChildSpec(c)], CALM)
    with pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
    with trio.fail_after(60):
        await supervisor.stop(1)


async def test_stop_while_the_children_are_starting_does_not_crash_the_supervisor(
    autojump_clock: trio.abc.Clock,
) -> None:
    """BUG: a child whose scope stop() cancelled before it was ready makes ``run`` raise
    RuntimeError('child exited without calling task_status.started()')."""
    a, b = Worker("a", start_delay=1), Worker("b", start_delay=1)
    supervisor = Supervisor("root", [ChildSpec(a), ChildSpec(b)], CALM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await trio.sleep(0.5)
        await supervisor.stop(0.1)
    assert [s.state for s in supervisor.statistics()] == ["stopped", "stopped"]
