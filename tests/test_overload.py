"""Overload, end to end: a server in its own process, flooded with ``events.ingest`` over
loopback, sheds what its admission budget cannot hold (RESOURCE_EXHAUSTED with a retry hint),
stores exactly what it acknowledged, keeps answering another connection, and takes ingests
again once the flood stops. Small and bounded: a few seconds, loops bounded in count and time
(`bench/overload.py` is the full measurement)."""

from __future__ import annotations

import asyncio

import trio

from protocols import api
from protocols.asyncio_client import open_client as open_asyncio_client
from protocols.errors import CallError, Status
from protocols.trio_client import Client, open_client

#: The budget of these servers: a few batches of the flood.
BUDGET = {"PIGEON_INGEST__BACKLOG_EVENTS": "2000"}
CONNECTIONS = 8
CALLS = 40
BATCH = 250
IDENTITIES = 5


def flood_batch(connection: int) -> api.IngestEvents:
    return api.IngestEvents(events=[
        api.Event(identity=f"flood:{connection}:{i % IDENTITIES}", type="commerce.purchase", data={"i": i})
        for i in range(BATCH)
    ])


async def stored(client: Client, identity: str) -> int:
    count = 0
    async with client.stream(api.ListEvents(identity=identity, limit=1_000_000)) as items:
        async for _ in items:
            count += 1
    return count


async def ingest_after_hints(client: Client, request: api.IngestEvents, attempts: int = 50) -> api.IngestResult:
    """The call, sent again after each refusal's hint (a bounded number of times)."""
    for _ in range(attempts - 1):
        try:
            return await client.call(request)
        except CallError as exc:
            if exc.status is not Status.RESOURCE_EXHAUSTED or exc.retry_after_ms is None:
                raise
            await trio.sleep(exc.retry_after_ms / 1000)
    return await client.call(request)


async def test_a_flood_is_shed_with_a_hint_and_every_acknowledged_event_is_stored(spawn_server):
    server = spawn_server(env=BUDGET)
    accepted = [0] * CONNECTIONS
    refusals: list[CallError] = []
    health_answers = 0

    async def flooder(c: int) -> None:
        batch = flood_batch(c)
        async with open_client(server.address) as client:

            async def one() -> None:
                try:
                    result = await client.call(batch)
                except CallError as exc:
                    refusals.append(exc)
                else:
                    accepted[c] += result.accepted

            async with trio.open_nursery() as calls:
                for _ in range(CALLS):
                    calls.start_soon(one)

    async def bystander(done: trio.Event) -> None:
        nonlocal health_answers
        async with open_client(server.address) as client:
            while not done.is_set() or not health_answers:
                with trio.fail_after(10):
                    assert (await client.call(api.GetHealth())).status == "serving"
                health_answers += 1
                await trio.sleep(0.02)

    done = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander, done)
            async with trio.open_nursery() as flood:
                for c in range(CONNECTIONS):
                    flood.start_soon(flooder, c)
            done.set()

    # Shed, with a hint, and nothing else went wrong.
    assert refusals, "nothing was shed"
    assert {exc.status for exc in refusals} == {Status.RESOURCE_EXHAUSTED}
    assert all(exc.retry_after_ms is not None and 10 <= exc.retry_after_ms <= 5_000 for exc in refusals)
    assert sum(accepted) + len(refusals) * BATCH == CONNECTIONS * CALLS * BATCH
    assert sum(accepted) > 0
    assert health_answers > 0

    async with open_client(server.address) as client:
        # After the flood an ordinary ingest is taken (at once, or after the hint).
        result = await ingest_after_hints(client, api.IngestEvents(events=[api.Event(identity="after:1", type="app.launch")]))
        assert result.accepted == 1
        # The books: every acknowledged event is stored, and nothing of a shed call.
        stats = await client.call(api.GetStats())
        assert stats.store is not None and stats.store.events == sum(accepted) + 1
        for c in range(CONNECTIONS):
            for i in range(IDENTITIES):
                count = await stored(client, f"flood:{c}:{i}") if accepted[c] else 0
                assert count == accepted[c] // IDENTITIES
        budget = next(a for a in stats.actors if a.name == "ingestion").details["budget"]
        assert budget["shed_calls"] == len(refusals) and budget["events"] == 0 and budget["bytes"] == 0


async def test_the_trio_batcher_sends_shed_batches_again_and_loses_nothing(spawn_server):
    server = spawn_server(env={"PIGEON_INGEST__BACKLOG_EVENTS": "1"})  # one batch at a time
    async with open_client(server.address) as client:
        with trio.fail_after(30):
            async with client.event_batcher(batch_size=100, max_in_flight=4) as batcher:
                for i in range(2_000):
                    await batcher.add(api.Event(identity=f"batched:{i % 4}", type="app.launch"))
        assert batcher.accepted == 2_000 and not batcher.failed and not batcher.rejected
        assert batcher.retried > 0
        assert [await stored(client, f"batched:{i}") for i in range(4)] == [500] * 4


def test_the_asyncio_batcher_sends_shed_batches_again_and_loses_nothing(spawn_server):
    server = spawn_server(env={"PIGEON_INGEST__BACKLOG_EVENTS": "1"})

    async def main() -> tuple[int, int, int, int]:
        async with open_asyncio_client(server.address) as client:
            async with client.event_batcher(batch_size=100, max_in_flight=4, call_timeout=30) as batcher:
                for i in range(2_000):
                    await batcher.add(api.Event(identity="batched:a", type="app.launch"))
            stats = await client.call(api.GetStats())
            assert stats.store is not None
            return batcher.accepted, len(batcher.failed), batcher.retried, stats.store.events

    async def bounded() -> tuple[int, int, int, int]:
        return await asyncio.wait_for(main(), 30)

    accepted, failed, retried, events = asyncio.run(bounded())
    assert (accepted, failed, events) == (2_000, 0, 2_000)
    assert retried > 0
