"""Ingestion: per-event validation, coalescing, hand-off to the journeys engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import trio

from protocols import api
from server import InvalidArgument
from server._ingest import MAX_EVENT_DATA_BYTES, decode_batch

NOW = 1_800_000_000_000_000
DAY = 86_400_000_000


def _body(events: list) -> bytes:
    return msgspec.msgpack.encode({"events": events})


def test_a_valid_batch_decodes_in_one_pass():
    when = datetime(2027, 1, 15, 8, tzinfo=UTC)
    accepted, rejected = decode_batch(
        _body([{"identity": "crm:1", "type": "a.b", "data": {"x": 1}}, {"identity": "crm:2", "type": "c", "ts": when}]),
        now_us=NOW, retention_us=90 * DAY,
    )
    assert rejected == []
    assert [(i, t) for i, t, _, _ in accepted] == [("crm:1", "a.b"), ("crm:2", "c")]
    assert accepted[0][2] == NOW and msgspec.msgpack.decode(accepted[0][3]) == {"x": 1}


def test_each_bad_event_is_reported_by_index_and_its_neighbours_are_kept():
    now = datetime.fromtimestamp(NOW / 1e6, UTC)
    events = [
        {"identity": "crm:1", "type": "ok"},
        {"identity": "CRM:1", "type": "ok"},  # bad identity
        {"identity": "crm:1", "type": 5},  # wrong type
        {"identity": "crm:1"},  # missing type
        {"identity": "crm:1", "type": "ok", "colour": "red"},  # unknown field
        {"identity": "crm:1", "type": "ok", "ts": now + timedelta(hours=1)},  # future
        {"identity": "crm:1", "type": "ok", "ts": now - timedelta(days=91)},  # too old
        {"identity": "crm:1", "type": "ok", "data": [1, 2]},  # data not a map
        {"identity": "crm:1", "type": "ok", "data": {"b": "x" * (MAX_EVENT_DATA_BYTES + 1)}},  # too big
        {"identity": "crm:" + "é" * 300, "type": "ok"},  # identity over 511 bytes
        "not an event",
        {"identity": "crm:2", "type": "ok", "ts": now - timedelta(days=89)},
    ]
    accepted, rejected = decode_batch(_body(events), now_us=NOW, retention_us=90 * DAY)
    assert [a[0] for a in accepted] == ["crm:1", "crm:2"]
    by_index = {r.index: r for r in rejected}
    assert sorted(by_index) == list(range(1, 11))
    assert by_index[1].field == "$.events[1].identity" and "identity like crm:42" in by_index[1].message
    assert by_index[2].field == "$.events[2].type" and "got `int`" in by_index[2].message
    assert "missing required field `type`" in by_index[3].message
    assert "colour" in by_index[4].message
    assert by_index[5].code == "OUT_OF_RANGE" and "future" in by_index[5].message
    assert by_index[6].code == "OUT_OF_RANGE" and "90 days" in by_index[6].message
    assert by_index[7].field == "$.events[7].data" and "map" in by_index[7].message
    assert "limit" in by_index[8].message
    assert by_index[9].field == "$.events[9].identity"
    assert by_index[10].field == "$.events[10]"
    assert all(r.message.startswith(r.field) for r in rejected)


def test_a_body_that_is_not_a_batch_is_refused_as_a_whole():
    with pytest.raises(InvalidArgument, match="not an event batch"):
        decode_batch(b"\xc1", now_us=NOW, retention_us=DAY)
    with pytest.raises(InvalidArgument, match=r"\$.events"):
        decode_batch(msgspec.msgpack.encode({"events": 3}), now_us=NOW, retention_us=DAY)
    with pytest.raises(InvalidArgument, match="10000"):
        decode_batch(_body([{"identity": "crm:1", "type": "t"}] * 10_001), now_us=NOW, retention_us=DAY)


async def test_batch_results_over_the_wire(client):
    result = await client.call(
        api.IngestEvents(events=[api.Event(identity="crm:1", type="ok"), api.Event(identity="crm:2", type="ok")])
    )
    assert result.accepted == 2 and result.rejected == [] and result.last_seq == 2
    # a batch where every event is bad is answered without touching the store
    result = await client.call(api.IngestEvents(events=[api.Event(identity="x", type="ok")]))
    assert result.accepted == 0 and [r.index for r in result.rejected] == [0]


async def test_concurrent_small_batches_are_coalesced_into_fewer_store_ops(client, server):
    async with trio.open_nursery() as nursery:
        for k in range(200):
            nursery.start_soon(client.call, api.IngestEvents(events=[api.Event(identity=f"crm:{k % 10}", type="t")]))
    ingestion = server.ingestion.details()
    assert ingestion["events_accepted"] == 200 and ingestion["batches"] == 200
    assert ingestion["store_ops"] < 200
    assert server.store.counts()["events"] == 200
    # the journeys engine follows the committed log
    journeys = server.journeys.details()
    assert journeys["log_end"] == 200
    with trio.fail_after(5):
        while server.journeys.position < 200:
            await trio.sleep(0.01)
    assert server.journeys.events_seen == 200


async def test_events_create_profiles_for_unknown_identities(client):
    await client.call(api.IngestEvents(events=[api.Event(identity="ecid:abc", type="app.launch")]))
    profile = await client.call(api.GetProfile(identity="ecid:abc"))
    assert profile.identities == ["ecid:abc"] and profile.attributes == {}


def test_event_data_keys_must_be_strings():
    accepted, rejected = decode_batch(
        _body([{"identity": "crm:1", "type": "t", "data": {1: "a"}}, {"identity": "crm:1", "type": "t", "data": {"k": {1: 2}}}]),
        now_us=NOW, retention_us=DAY,
    )
    assert [r.index for r in rejected] == [0] and "keys must be strings" in rejected[0].message
    assert len(accepted) == 1  # nested maps may have any keys, as in attributes


def test_a_retention_reaching_before_1970_accepts_no_pre_1970_event():
    old = {"identity": "crm:1", "type": "t", "ts": datetime(1969, 12, 31, tzinfo=UTC)}
    accepted, rejected = decode_batch(_body([old]), now_us=NOW, retention_us=100_000 * DAY)
    assert accepted == [] and rejected[0].code == "OUT_OF_RANGE"
