"""Ingestion: per-event validation, coalescing, hand-off to the journeys engine."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols import api
from protocols.trio_client import open_client
from protocols.errors import CallError, Status
from server import InvalidArgument
from server.profiles.ingest import MAX_EVENT_DATA_BYTES, decode_batch, peek_event_count

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
    assert server.store.default.counts()["events"] == 200
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


# -- event data obeys the rules of attributes -----------------------------------------------------

_BAD_TIMESTAMP = msgspec.msgpack.Ext(-1, b"\xff" * 12)  # 12-byte form, nanoseconds over 10**9


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"n": value}
    return value


#: (value under the key "x", the path of the offending part below it) for values no profile
#: and no event may hold.
UNSTORABLE = [
    (_BAD_TIMESTAMP, "[...]"),  # msgspec names a value of a free-form map so
    (msgspec.msgpack.Ext(-1, b"\x00" * 5), "[...]"),  # a timestamp is 4, 8 or 12 bytes
    ({"a": [1, {"b": _BAD_TIMESTAMP}]}, "[...][...][1][...]"),
    (_nested(32), ".x" + ".n" * 32),  # its innermost map is 33 levels below the top one
    ([[[_nested(30)]]], ".x[0][0][0]" + ".n" * 29),
]
#: Values both take, and give back as they were (PROTOCOL.md, section 4.2).
STORABLE = [
    datetime(2027, 1, 15, 8, 30, 1, 500, tzinfo=UTC),
    b"\x00\xffbinary",
    {1: "keys of any type below the top", (1, 2): "an array", None: [None, True, 1.5, -(2**63), 2**64 - 1]},
    msgspec.msgpack.Ext(5, b"other extension types are kept"),
    _nested(31),
    "é" * 100,
]


@pytest.mark.parametrize("value, path", UNSTORABLE)
async def test_event_data_that_attributes_refuse_is_rejected_by_index_and_field(client, value, path):
    with pytest.raises(CallError) as refused:
        await client.call(api.UpsertProfile(identity="crm:1", attributes={"x": value}))
    assert refused.value.status is Status.INVALID_ARGUMENT
    good = api.Event(identity="crm:1", type="ok", data={"x": 1})
    result = await client.call(
        api.IngestEvents(events=[good, api.Event(identity="crm:1", type="bad", data={"x": value}), good])
    )
    assert result.accepted == 2 and [r.index for r in result.rejected] == [1]
    rejection = result.rejected[0]
    field = "$.events[1].data" + path
    assert rejection.field == field and rejection.message.startswith(field + ": ")
    assert rejection.message.endswith(refused.value.message.split(": ", 1)[-1].removeprefix("attributes "))
    # what was stored is what can be read back
    async with client.stream(api.ListEvents(identity="crm:1")) as events:
        assert [e.data async for e in events] == [{"x": 1}, {"x": 1}]


@pytest.mark.parametrize("value", STORABLE, ids=lambda v: type(v).__name__)
async def test_event_data_that_attributes_take_is_stored_and_read_back(client, value):
    profile = await client.call(api.UpsertProfile(identity="crm:1", attributes={"x": value}))
    assert profile.attributes == {"x": value}
    result = await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="ok", data={"x": value})]))
    assert result.accepted == 1 and result.rejected == []
    async with client.stream(api.ListEvents(identity="crm:1")) as events:
        assert [e.data async for e in events] == [{"x": value}]


def test_a_batch_too_deep_for_the_decoder_is_refused_as_a_whole():
    deep = b"\x91" * 100_000 + b"\xc0"  # msgspec cannot even skip over it
    body = b"\x81\xa6events\x91\x83\xa8identity\xa5crm:1\xa4type\xa1t\xa4data\x81\xa1x" + deep
    with pytest.raises(InvalidArgument, match="deeper than the 32 levels") as refused:
        decode_batch(body, now_us=NOW, retention_us=DAY)
    assert refused.value.field == "$.events"
    # also when an earlier event sends decoding down the slower path, event by event
    body = b"\x81\xa6events\x92\x81\xa4type\x05\x83\xa8identity\xa5crm:1\xa4type\xa1t\xa4data\x81\xa1x" + deep
    with pytest.raises(InvalidArgument, match="deeper than the 32 levels"):
        decode_batch(body, now_us=NOW, retention_us=DAY)


# -- fuzzed event data, through a real server -----------------------------------------------------

_keys = st.one_of(
    st.text(max_size=6), st.integers(-3, 3), st.booleans(), st.none(), st.binary(max_size=2),
    st.tuples(st.integers(0, 2)), st.floats(allow_nan=False, width=32),
)
_extensions = st.one_of(
    st.builds(msgspec.msgpack.Ext, st.just(-1), st.binary(min_size=4, max_size=4) | st.binary(min_size=8, max_size=8)
              | st.binary(min_size=12, max_size=12) | st.binary(max_size=13)),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8)),
)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
    st.datetimes(timezones=st.just(UTC)), _extensions,
    st.integers(0, 70_000).map("x".__mul__),  # sizes around the 64 KiB limit of data
)


def _nest(value, path: list[bool]):
    for as_map in path:
        value = {"k": value} if as_map else [value]
    return value


def _mostly(usual, *rare):
    """``usual`` seven times in ten, else one of ``rare``."""
    return st.sampled_from([usual] * 7 + [*rare] * (3 // len(rare))).flatmap(lambda strategy: strategy)


_values = _mostly(
    st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3), max_leaves=12),
    st.builds(_nest, _scalars, st.lists(st.booleans(), min_size=28, max_size=40)),  # around the depth limit
    st.builds(_nest, _scalars, st.lists(st.booleans(), min_size=100, max_size=300)),
)
_data = _mostly(  # mostly maps with string keys, as data should be
    st.dictionaries(st.text(max_size=6), _values, max_size=4), st.dictionaries(_keys, _values, max_size=3), _values
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_data)
def test_fuzzed_event_data_is_refused_as_attributes_are_and_read_back_as_sent(server_process, data):
    """Whatever the data, an event and a profile's attributes get the same verdict; a refusal
    names the event and a field inside its data; what is accepted is listed back as sent."""
    encoded = msgspec.msgpack.encode(data)
    try:
        sent = msgspec.msgpack.decode(encoded)  # what a client reads back if it is stored
    except (msgspec.DecodeError, RecursionError):
        sent = None  # not even readable: must be refused

    async def check() -> None:
        identity = f"crm:{next(_fuzz_ids)}"
        async with open_client(server_process.address) as client:
            result = await client.call(api.IngestEvents(events=[api.Event(identity=identity, type="t", data=data)]))
            event("accepted" if result.accepted else result.rejected[0].message.split(": ", 1)[1][:30])
            try:
                profile = await client.call(api.UpsertProfile(identity="crm:profile", attributes=data))
                as_attributes = profile.attributes
            except CallError as exc:
                assert exc.status is Status.INVALID_ARGUMENT, exc
                as_attributes = None
            if result.accepted:
                assert sent is not None and len(encoded) <= MAX_EVENT_DATA_BYTES
                async with client.stream(api.ListEvents(identity=identity)) as events:
                    assert [e.data async for e in events] == [sent]
                assert as_attributes == sent
            else:
                (rejection,) = result.rejected
                assert rejection.code == "INVALID_ARGUMENT" and rejection.field.startswith("$.events[0].data")
                assert rejection.message.startswith(rejection.field + ": ")
                if len(encoded) <= MAX_EVENT_DATA_BYTES:
                    assert as_attributes is None, rejection

    trio.run(check)


_fuzz_ids = itertools.count()


# ---------------------------------------------------------------------------------------------
# the count read before decoding (the admission budget's weight of a call)


@settings(max_examples=100, deadline=None)
@given(count=st.sampled_from([0, 1, 15, 16, 17, 500, 65_535, 65_536]) | st.integers(0, 2_000))
def test_the_event_count_is_read_from_the_first_bytes(count: int) -> None:
    body = msgspec.msgpack.encode(api.IngestEvents(events=[api.Event(identity="crm:1", type="app.launch")] * count))
    assert peek_event_count(body) == min(count, api.MAX_EVENTS_PER_BATCH, max(1, len(body) // 16))
    if count <= api.MAX_EVENTS_PER_BATCH:
        assert peek_event_count(body) == count


def test_the_count_of_unusual_but_valid_encodings_is_read_too() -> None:
    event = msgspec.msgpack.encode({"identity": "crm:1", "type": "app.launch"})
    for head in (b"\x81\xa6events", b"\xde\x00\x01\xd9\x06events", b"\xdf\x00\x00\x00\x01\xda\x00\x06events"):
        for array in (b"\x93", b"\xdc\x00\x03", b"\xdd\x00\x00\x00\x03"):
            body = head + array + event * 3
            assert msgspec.msgpack.decode(body) == {"events": [{"identity": "crm:1", "type": "app.launch"}] * 3}
            assert peek_event_count(body) == 3


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400) | st.builds(lambda obj: msgspec.msgpack.encode(obj), st.dictionaries(
    st.sampled_from(["events", "event", "x"]), st.lists(st.integers(0, 9), max_size=30) | st.integers(0, 9) | st.text(), max_size=2)))
def test_any_other_body_weighs_at_least_one_and_at_most_a_full_batch(body: bytes) -> None:
    count = peek_event_count(body)
    assert 1 <= count <= api.MAX_EVENTS_PER_BATCH or count == 0
    try:
        decoded = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return
    if isinstance(decoded, dict) and isinstance(decoded.get("events"), list) and len(decoded) == 1:
        # An array header is believed up to what the body's size can hold (16 bytes an event at least).
        assert count >= min(len(decoded["events"]), api.MAX_EVENTS_PER_BATCH, max(1, len(body) // 16))
