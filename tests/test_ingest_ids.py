"""Idempotent ingestion: an event's client ``id`` is stored once per sandbox within the window
(``ingest.dedupe_window_s``). Real servers on loopback sockets, real LMDB; the clients' event
batchers give every event an id, so a batch they (or their caller) send again is stored once."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols import api
from protocols.asyncio_client import open_client as open_asyncio_client
from protocols.errors import BatchFailed, CallError
from protocols.trio_client import Client, open_client
from server import Server
from server.profiles.writes import MIN_ID_SWEEP

from .conftest import make_config


def _batch(prefix: str, count: int, identity: str = "crm:1") -> list[api.Event]:
    return [api.Event(identity=identity, type="app.launch", id=f"{prefix}-{i}") for i in range(count)]


async def _stored(client: Client, identity: str) -> int:
    async with client.stream(api.ListEvents(identity=identity, limit=100_000)) as items:
        return len([item async for item in items])


async def _serve(tmp_path: Path, **overrides) -> AsyncIterator[Server]:
    srv = Server(make_config(tmp_path / "data", **overrides))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        srv.request_stop()


#: A window short enough to wait out, long enough for a resend on a loaded machine.
WINDOW_S = 2.0


@pytest.fixture
async def short_window(tmp_path: Path) -> AsyncIterator[Server]:
    async for srv in _serve(tmp_path, ingest={"dedupe_window_s": WINDOW_S}):
        yield srv


async def test_a_batch_sent_twice_is_stored_and_evaluated_once(client, server):
    events = [*_batch("a", 2), api.Event(identity="crm:1", type="no.id"),
              api.Event(identity="crm:1", type="x", id="a-3")]
    first = await client.call(api.IngestEvents(events=events))
    assert (first.accepted, first.duplicates, first.rejected) == (4, [], [])
    # sent again (its answer lost), with a bad event in front: indexes are the batch's
    again = await client.call(api.IngestEvents(events=[api.Event(identity="BAD", type="t"), *events]))
    assert again.accepted == 1 and again.duplicates == [1, 2, 4] and [r.index for r in again.rejected] == [0]
    assert again.last_seq == first.last_seq + 1  # only the event without an id was logged
    assert await _stored(client, "crm:1") == 5
    assert server.ingestion.details()["events_duplicate"] == 3
    stats = await client.call(api.GetStats())
    (ingestion,) = [actor for actor in stats.actors if actor.name == "ingestion"]
    assert ingestion.details["events_duplicate"] == 3 and ingestion.details["events_accepted"] == 5
    # the journeys engine follows the log: it sees each event once
    with trio.fail_after(5):
        while server.journeys.position < again.last_seq:
            await trio.sleep(0.01)
    assert server.journeys.events_seen == 5
    # a batch of duplicates only is answered without logging anything
    only = await client.call(api.IngestEvents(events=_batch("a", 2)))
    assert (only.accepted, only.duplicates, only.last_seq) == (0, [0, 1], 0)


async def test_an_id_twice_in_one_batch_is_stored_once(client):
    events = [api.Event(identity="crm:1", type="t", id="same"), api.Event(identity="crm:2", type="t", id="same")]
    result = await client.call(api.IngestEvents(events=events))
    assert (result.accepted, result.duplicates) == (1, [1])
    assert await _stored(client, "crm:1") == 1
    with pytest.raises(CallError, match="no profile"):
        await client.call(api.GetProfile(identity="crm:2"))  # never created: the event was not stored


async def test_concurrent_copies_of_a_batch_store_once(server):
    """Copies on several connections at once: whether they meet in one write op (coalesced)
    or in consecutive ones, each event is stored once."""
    events = _batch("c", 50, identity="crm:c")
    results: list[api.IngestResult] = []

    async def send(client: Client) -> None:
        results.append(await client.call(api.IngestEvents(events=events)))

    async with open_client(server.addresses[0]) as one, open_client(server.addresses[0]) as two:
        for _ in range(3):  # rounds: the first stores, the later ones are all duplicates
            async with trio.open_nursery() as nursery:
                for k in range(8):
                    nursery.start_soon(send, (one, two)[k % 2])
        assert sum(r.accepted for r in results) == 50
        assert sum(len(r.duplicates) for r in results) == 50 * 23
        assert all(r.accepted + len(r.duplicates) == 50 for r in results)
        assert await _stored(one, "crm:c") == 50
    assert server.store.default.counts()["events"] == 50


async def test_an_id_is_stored_again_after_the_window_and_expired_ids_are_swept(short_window):
    server = short_window
    async with open_client(server.addresses[0]) as client:
        assert (await client.call(api.IngestEvents(events=_batch("w", 200)))).accepted == 200
        assert (await client.call(api.IngestEvents(events=_batch("w", 1)))).duplicates == [0]
        counts = server.store.default.counts()
        assert counts["event_ids"] == counts["event_id_log"] == 200
        await trio.sleep(WINDOW_S + 0.2)
        # past the window: stored again; the ingest forgets a bounded number of expired ids
        again = await client.call(api.IngestEvents(events=_batch("w", 1)))
        assert (again.accepted, again.duplicates) == (1, [])
        counts = server.store.default.counts()
        assert counts["event_id_log"] == 200 - MIN_ID_SWEEP + 1
        assert counts["event_ids"] == 200 - MIN_ID_SWEEP + 1  # w-0's old entry went, its new one stays
        # the id stored again is remembered anew (its old log entry did not take it along)
        assert (await client.call(api.IngestEvents(events=_batch("w", 1)))).duplicates == [0]
        for _ in range(5):
            await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t")]))
        counts = server.store.default.counts()
        assert counts["event_ids"] == counts["event_id_log"] == 1
        assert await _stored(client, "crm:1") == 200 + 1 + 5


async def test_a_window_of_zero_remembers_nothing(tmp_path):
    async for server in _serve(tmp_path, ingest={"dedupe_window_s": 0}):
        async with open_client(server.addresses[0]) as client:
            for _ in range(2):
                result = await client.call(api.IngestEvents(events=_batch("z", 3)))
                assert (result.accepted, result.duplicates) == (3, [])
            assert await _stored(client, "crm:1") == 6
            assert server.store.default.counts()["event_ids"] == 0


async def test_ids_are_per_sandbox(client, server):
    await client.call(api.CreateSandbox(name="dev"))
    events = _batch("s", 3)
    async with open_client(server.addresses[0], sandbox="dev") as dev:
        for target in (client, dev):
            assert (await target.call(api.IngestEvents(events=events))).accepted == 3
        for target in (client, dev):
            assert (await target.call(api.IngestEvents(events=events))).duplicates == [0, 1, 2]
            assert await _stored(target, "crm:1") == 3
    assert server.store.space("dev").counts()["event_ids"] == 3 == server.store.default.counts()["event_ids"]


BAD_IDS = ["", "x" * 65, "a b", "é", "a/b", "line\n"]


async def test_a_bad_id_rejects_its_event_alone_and_names_the_field(client):
    # a client encodes what it is given: the server checks
    events = [api.Event(identity="crm:1", type="t", id="x" * 64)]
    events += [api.Event(identity="crm:1", type="t", id=bad) for bad in BAD_IDS]
    events.append(api.Event(identity="crm:1", type="t", id=5))  # type: ignore[arg-type]
    events.append(api.Event(identity="crm:1", type="t", id=None))
    result = await client.call(api.IngestEvents(events=events))
    assert result.accepted == 2
    assert [r.index for r in result.rejected] == list(range(1, len(BAD_IDS) + 2))
    for rejection in result.rejected:
        field = f"$.events[{rejection.index}].id"
        assert rejection.code == "INVALID_ARGUMENT" and rejection.field == field
        assert rejection.message.startswith(field + ": ")
    assert "an event id (1 to 64 letters" in result.rejected[0].message
    assert "got `int`" in result.rejected[-1].message


def test_an_id_is_checked_by_the_request_type_too():
    with pytest.raises(msgspec.ValidationError, match="an event id|regex"):
        msgspec.convert({"identity": "crm:1", "type": "t", "id": "a b"}, api.Event)
    assert msgspec.convert({"identity": "crm:1", "type": "t", "id": "Ab0_.:-"}, api.Event).id == "Ab0_.:-"


# -- the batchers ---------------------------------------------------------------------------------


async def test_the_trio_batcher_gives_events_ids_so_a_failed_batch_sent_again_stores_once(server):
    async with open_client(server.addresses[0]) as client:
        async with client.event_batcher(batch_size=10) as batcher:
            await batcher.add(api.Event(identity="crm:b", type="bad type"))
            await batcher.add(api.Event(identity="crm:b", type="bad type", id="mine"))
            for _ in range(8):
                await batcher.add(api.Event(identity="crm:b", type="ok"))
        (given, _), (kept, _) = batcher.rejected
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", given.id or "") and kept.id == "mine"
        # a batch whose answer never came (here: a deadline too short to wait for it) may
        # or may not be stored; sent again, twice, it is stored once
        with pytest.raises(BatchFailed):
            async with client.event_batcher(batch_size=50, call_timeout=0.0005) as batcher:
                for i in range(50):
                    await batcher.add(api.Event(identity="crm:lost", type="ok", data={"i": i}))
        (failed,) = batcher.failed
        assert all(e.id for e in failed.events) and len({e.id for e in failed.events}) == 50
        first = await client.call(api.IngestEvents(events=failed.events))
        second = await client.call(api.IngestEvents(events=failed.events))
        assert first.accepted + len(first.duplicates) == 50 and second.duplicates == list(range(50))
        assert await _stored(client, "crm:lost") == 50
        async with client.event_batcher(batch_size=50) as batcher:
            for e in failed.events:
                await batcher.add(e)
        assert (batcher.accepted, batcher.duplicates) == (0, 50)
        async with client.event_batcher(batch_size=5, ids=False) as batcher:
            await batcher.add(api.Event(identity="crm:b", type="bad type"))
        assert batcher.rejected[0][0].id is None


def test_the_asyncio_batcher_gives_events_ids(server_process):
    async def main() -> None:
        async with open_asyncio_client(server_process.address) as client:
            for _ in range(2):
                async with client.event_batcher(batch_size=10, call_timeout=30) as batcher:
                    await batcher.add(api.Event(identity="crm:a", type="bad type"))
                    for i in range(5):
                        await batcher.add(api.Event(identity="crm:a", type="ok", id=f"asyncio-{i}"))
            assert (batcher.accepted, batcher.duplicates) == (0, 5)
            (given, rejection), = batcher.rejected
            assert re.fullmatch(r"[A-Za-z0-9_-]{22}", given.id or "") and rejection.index == 0
            result = await client.call(api.IngestEvents(events=_batch("asyncio", 5, identity="crm:a")))
            assert result.duplicates == list(range(5))

    asyncio.run(asyncio.wait_for(main(), 30))


async def test_a_batch_the_batcher_sends_again_after_a_shed_is_stored_once(spawn_server):
    server = spawn_server(env={"PIGEON_INGEST__BACKLOG_EVENTS": "1"})  # one batch at a time
    async with open_client(server.address) as client:
        with trio.fail_after(30):
            async with client.event_batcher(batch_size=100, max_in_flight=4) as batcher:
                for i in range(1_000):
                    await batcher.add(api.Event(identity=f"shed:{i % 2}", type="app.launch"))
        assert batcher.retried > 0 and batcher.accepted == 1_000 and batcher.duplicates == 0
        assert [await _stored(client, f"shed:{i}") for i in range(2)] == [500, 500]


# -- fuzzed ids, through a real server --------------------------------------------------------------

_ids = st.one_of(
    st.from_regex(api.EVENT_ID_PATTERN),
    st.text(max_size=70),
    st.text(alphabet="ab_.:-0/ \n", min_size=60, max_size=70),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event_id=_ids)
def test_fuzzed_ids_are_stored_once_or_refused_by_field(server_process, event_id):
    valid = re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", event_id) is not None

    async def check() -> None:
        identity = f"crm:{next(_fuzz_ids)}"
        request = api.IngestEvents(events=[api.Event(identity=identity, type="t", id=event_id)])
        async with open_client(server_process.address) as client:
            results = [await client.call(request) for _ in range(2)]
            first, second = results
            if valid:
                # the same id may have come up in an earlier example: then both are duplicates
                assert first.rejected == [] and first.accepted + len(first.duplicates) == 1
                assert (second.accepted, second.duplicates) == (0, [0])
                event("stored" if first.accepted else "seen before")
            else:
                for result in results:
                    (rejection,) = result.rejected
                    assert rejection.field == "$.events[0].id" and rejection.message.startswith("$.events[0].id: ")
                event("refused")

    trio.run(check)


_fuzz_ids = itertools.count()
