"""The ingest admission budget (`server.profiles.budget`): what it admits, refuses and hints."""

from __future__ import annotations

import time

import pytest
import trio

from protocols.errors import Status
from server.profiles.budget import MAX_RETRY_MS, MIN_RETRY_MS, SHEDDING_S, DecodeLane, IngestBudget
from server.runtime.errors import ResourceExhausted


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admits_within_events_and_bytes_and_refuses_beyond_either():
    budget = IngestBudget(max_events=1000, max_bytes=10_000)
    first = budget.admit(600, 4_000)
    budget.admit(400, 4_000)
    assert (budget.events, budget.bytes) == (1000, 8_000)
    with pytest.raises(ResourceExhausted) as refused:
        budget.admit(1, 10)
    assert refused.value.status is Status.RESOURCE_EXHAUSTED
    assert "nothing of this call was stored" in refused.value.message
    first.release()
    with pytest.raises(ResourceExhausted):
        budget.admit(100, 6_001)  # the events fit, the bytes do not
    budget.admit(100, 6_000)
    stats = budget.statistics()
    assert (stats.events, stats.bytes, stats.admitted_calls, stats.shed_calls, stats.shed_events) == (500, 10_000, 3, 2, 101)


def test_an_empty_budget_admits_a_call_larger_than_itself():
    budget = IngestBudget(max_events=10, max_bytes=100)
    big = budget.admit(10_000, 5_000_000)
    with pytest.raises(ResourceExhausted):
        budget.admit(1, 1)
    big.release()
    budget.admit(1, 1)


def test_release_is_once_and_resize_follows_the_decoded_count():
    budget = IngestBudget(max_events=1000, max_bytes=10_000)
    ticket = budget.admit(500, 1_000)
    ticket.resize(120)  # 380 events were rejected, or the count was an estimate
    assert budget.events == 120
    ticket.release()
    ticket.release()
    ticket.resize(999)  # after its release a ticket changes nothing
    assert (budget.events, budget.bytes, budget.calls) == (0, 0, 0)


def test_the_hint_is_half_the_backlog_at_the_commit_rate_within_bounds():
    clock = FakeClock()
    budget = IngestBudget(max_events=100_000, max_bytes=1 << 30, clock=clock)
    assert budget.retry_after_ms() == 100  # no commit measured yet
    for _ in range(10):  # 10,000 events committed a second
        budget.admit(1_000, 1).release(committed=True)
        clock.now += 0.1
    rate = budget.statistics().drain_events_per_s
    assert rate == pytest.approx(10_000, rel=0.25)
    held = budget.admit(40_000, 1)
    assert budget.retry_after_ms() == round(20_000 / rate * 1000)  # half of 40,000 at the rate
    held.resize(10)
    assert budget.retry_after_ms() == MIN_RETRY_MS
    held.resize(100_000_000)
    assert budget.retry_after_ms() == MAX_RETRY_MS


def test_a_refusal_carries_the_hint():
    clock = FakeClock()
    budget = IngestBudget(max_events=10, max_bytes=100, clock=clock)
    budget.admit(10, 10)
    with pytest.raises(ResourceExhausted) as refused:
        budget.admit(5, 5)
    assert refused.value.retry_after_ms == budget.retry_after_ms()
    assert MIN_RETRY_MS <= refused.value.retry_after_ms <= MAX_RETRY_MS


def test_pressed_when_half_taken_or_shortly_after_a_refusal():
    clock = FakeClock()
    budget = IngestBudget(max_events=100, max_bytes=1_000, clock=clock)
    ticket = budget.admit(50, 10)
    assert not budget.pressed()
    ticket.resize(51)
    assert budget.pressed()
    with pytest.raises(ResourceExhausted):
        budget.admit(60, 10)
    ticket.release()
    assert budget.pressed()
    clock.now += SHEDDING_S
    assert not budget.pressed()


def test_a_budget_needs_room():
    with pytest.raises(ValueError):
        IngestBudget(max_events=0, max_bytes=1)


async def test_the_lane_decodes_one_at_a_time_and_paces_only_under_pressure(autojump_clock):
    budget = IngestBudget(max_events=100, max_bytes=1_000)
    lane = DecodeLane(budget)
    inside = 0
    most = 0

    async def decode() -> None:
        nonlocal inside, most
        async with lane.turn():
            inside += 1
            most = max(most, inside)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(decode)
    assert most == 1 and lane.paced == 0  # not pressed: one after the other, no pause
    budget.admit(100, 1)  # pressed: each decode is followed by a pause
    async with lane.turn():
        time.sleep(0.03)  # a decode of 30 ms (real time: what the lane measures)
    before = trio.current_time()
    await decode()
    assert lane.paced == 1
    assert trio.current_time() - before == pytest.approx(0.07, rel=0.5)  # 30 ms x 0.7 / 0.3
