"""The LMDB profile store, through the real server and directly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import lmdb
import msgspec
import pytest
import trio

from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import open_client
from server import SchemaError, Server
from server.delivery import apps as app_ops
from server.profiles import store as store_module
from server.profiles import writes as store_ops
from server.runtime.errors import InvalidArgument
from server.profiles.store import MAX_REGISTRATIONS, ProfileStore

from .conftest import make_config

APP = "com.acme.app"
TOKEN = "ab" * 32


async def test_upsert_replaces_attributes_and_patch_merges(client):
    p = await client.call(api.UpsertProfile(identity="crm:42", attributes={"a": 1, "person": {"first": "Ana"}}))
    assert p.identities == ["crm:42"] and p.attributes == {"a": 1, "person": {"first": "Ana"}}
    p = await client.call(
        api.PatchProfile(identity="crm:42", patch={"a": None, "person": {"last": "Lima"}, "tags": ["x", 2]})
    )
    assert p.attributes == {"person": {"first": "Ana", "last": "Lima"}, "tags": ["x", 2]}
    p = await client.call(api.UpsertProfile(identity="crm:42", attributes={"b": True}))
    assert p.attributes == {"b": True}
    assert p.updated >= p.created


async def test_typed_values_survive_a_round_trip(client):
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    attrs = {"int": -7, "big": 2**62, "float": 1.5, "bool": False, "none_in_list": [None], "when": when, "bin": b"\x00\x01"}
    p = await client.call(api.UpsertProfile(identity="crm:1", attributes=attrs))
    got = await client.call(api.GetProfile(identity="crm:1"))
    assert got.attributes == p.attributes
    assert got.attributes["when"] == when and got.attributes["bin"] == b"\x00\x01"


async def test_patch_without_create_on_missing_profile_is_not_found(client):
    with pytest.raises(CallError) as info:
        await client.call(api.PatchProfile(identity="crm:404", patch={"a": 1}, create=False))
    assert info.value.status is Status.NOT_FOUND and info.value.field == "$.identity"
    assert "crm:404" in info.value.message


async def test_link_and_unlink_identities(client):
    await client.call(api.UpsertProfile(identity="crm:1"))
    p = await client.call(api.LinkIdentity(identity="crm:1", link="email:ana@example.com"))
    assert p.identities == ["crm:1", "email:ana@example.com"]
    same = await client.call(api.GetProfile(identity="email:ana@example.com"))
    assert same.identities == p.identities
    # linking again is a no-op
    assert (await client.call(api.LinkIdentity(identity="crm:1", link="email:ana@example.com"))).identities == p.identities

    await client.call(api.UpsertProfile(identity="crm:2"))
    with pytest.raises(CallError) as info:
        await client.call(api.LinkIdentity(identity="crm:2", link="email:ana@example.com"))
    assert info.value.status is Status.ALREADY_EXISTS and info.value.field == "$.link"

    p = await client.call(api.UnlinkIdentity(identity="crm:1"))
    assert p.identities == ["email:ana@example.com"]
    with pytest.raises(CallError) as info:
        await client.call(api.GetProfile(identity="crm:1"))
    assert info.value.status is Status.NOT_FOUND
    with pytest.raises(CallError) as info:
        await client.call(api.UnlinkIdentity(identity="email:ana@example.com"))
    assert info.value.status is Status.FAILED_PRECONDITION


async def test_register_token_creates_profile_and_moves_between_profiles(client):
    r = await client.call(api.RegisterToken(identity="ecid:1", app=APP, platform="apns", token=TOKEN.upper()))
    assert r.created_profile and r.moved_from is None
    assert r.registration.token == TOKEN  # APNs tokens are stored in lower case
    first_seen = r.registration.first_seen

    await trio.sleep(0.002)
    r = await client.call(api.RegisterToken(identity="crm:7", app=APP, platform="apns", token=TOKEN))
    assert r.moved_from == "ecid:1"
    assert r.registration.first_seen == first_seen and r.registration.last_seen > first_seen
    assert (await client.call(api.GetProfile(identity="ecid:1"))).registrations == []
    regs = (await client.call(api.GetProfile(identity="crm:7"))).registrations
    assert [(x.app, x.platform, x.token, x.state) for x in regs] == [(APP, "apns", TOKEN, "active")]

    # the same token for another app is another registration
    await client.call(api.RegisterToken(identity="crm:7", app="com.acme.other", platform="fcm", token="f:1"))
    assert len((await client.call(api.GetProfile(identity="crm:7"))).registrations) == 2

    gone = await client.call(api.UnregisterToken(app=APP, token=TOKEN.upper()))
    assert gone.identity == "crm:7"
    with pytest.raises(CallError) as info:
        await client.call(api.UnregisterToken(app=APP, token=TOKEN))
    assert info.value.status is Status.NOT_FOUND


async def test_apns_token_must_be_hex(client):
    with pytest.raises(CallError) as info:
        await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="apns", token="xyz"))
    assert info.value.status is Status.INVALID_ARGUMENT and info.value.field == "$.token"


async def test_registrations_are_capped_evicting_the_least_recently_seen(client, server):
    replies = []
    for i in range(MAX_REGISTRATIONS + 2):
        replies.append(await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="fcm", token=f"t{i}")))
    tokens = [r.token for r in (await client.call(api.GetProfile(identity="crm:1"))).registrations]
    assert len(tokens) == MAX_REGISTRATIONS and "t0" not in tokens and "t1" not in tokens
    assert server.store.default.find_token(APP, "t0") is None  # the index forgot evicted tokens
    assert server.store.default.find_token(APP, "t2") is not None
    # the reply that evicts says which registration went
    assert all(r.evicted == [] for r in replies[:MAX_REGISTRATIONS])
    assert [[(e.app, e.platform, e.token) for e in r.evicted] for r in replies[MAX_REGISTRATIONS:]] == [
        [(APP, "fcm", "t0")], [(APP, "fcm", "t1")],
    ]


async def test_the_registration_cap_is_a_setting(tmp_path):
    """store.max_registrations; lowered, it trims a profile at its next registration, oldest first."""
    data = tmp_path / "data"
    for cap, tokens, evicted in ((4, ["a", "b", "c", "d", "e"], ["a"]), (2, ["f"], ["b", "c", "d"])):
        srv = Server(make_config(data, store={"max_registrations": cap}))
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            async with open_client(srv.addresses[0]) as client:
                for token in tokens:
                    reply = await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="fcm", token=token))
                assert [e.token for e in reply.evicted] == evicted
                assert all(e.app == APP and e.state == "active" for e in reply.evicted)
                profile = await client.call(api.GetProfile(identity="crm:1"))
                assert len(profile.registrations) == cap
                assert all(srv.store.default.find_token(APP, token) is None for token in evicted)
            srv.request_stop()


async def test_consent(client):
    entry = await client.call(api.SetConsent(identity="crm:1", app=APP, push="out"))
    assert entry.push == "out"
    p = await client.call(api.GetProfile(identity="crm:1"))
    assert p.consent[APP].push == "out"
    await client.call(api.SetConsent(identity="crm:1", app=APP, push="in"))
    assert (await client.call(api.GetProfile(identity="crm:1"))).consent[APP].push == "in"


async def test_delete_removes_every_trace(client, server):
    await client.call(api.UpsertProfile(identity="crm:1", attributes={"a": 1}))
    await client.call(api.LinkIdentity(identity="crm:1", link="email:a@example.com"))
    await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="fcm", token="tok"))
    await client.call(api.SetConsent(identity="crm:1", app=APP, push="in"))
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="x") for _ in range(3)]))
    # a neighbour whose data must survive
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:2", type="y")]))

    deleted = await client.call(api.DeleteProfile(identity="email:a@example.com"))
    assert sorted(deleted.identities) == ["crm:1", "email:a@example.com"]
    assert (deleted.registrations, deleted.events) == (1, 3)
    for identity in ("crm:1", "email:a@example.com"):
        with pytest.raises(CallError):
            await client.call(api.GetProfile(identity=identity))
    assert server.store.default.find_token(APP, "tok") is None
    counts = server.store.default.counts()
    assert (counts["profiles"], counts["identities"], counts["tokens"], counts["events"]) == (1, 1, 0, 1)
    # the identity can start afresh
    fresh = await client.call(api.UpsertProfile(identity="crm:1"))
    assert fresh.attributes == {} and fresh.registrations == []


async def test_events_list_filters_and_orders(client):
    base = datetime.now(UTC) - timedelta(hours=1)
    events = [api.Event(identity="crm:1", type="a" if i % 2 else "b", ts=base + timedelta(minutes=i), data={"i": i}) for i in range(10)]
    # ingest out of order: listing is by time
    result = await client.call(api.IngestEvents(events=list(reversed(events))))
    assert result.accepted == 10 and result.rejected == []

    async def collect(**kw):
        async with client.stream(api.ListEvents(identity="crm:1", **kw)) as items:
            return [e async for e in items]

    assert [e.data["i"] for e in await collect()] == list(range(10))
    assert [e.data["i"] for e in await collect(reverse=True)] == list(range(9, -1, -1))
    assert [e.data["i"] for e in await collect(type="a")] == [1, 3, 5, 7, 9]
    assert [e.data["i"] for e in await collect(since=base + timedelta(minutes=3), until=base + timedelta(minutes=5))] == [3, 4, 5]
    assert [e.data["i"] for e in await collect(limit=2, reverse=True)] == [9, 8]


async def test_events_list_pages_through_many_events(client):
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t", data={"i": i}) for i in range(1000)]))
    for reverse in (False, True):
        async with client.stream(api.ListEvents(identity="crm:1", limit=10_000, reverse=reverse)) as items:
            got = [e.seq async for e in items]
        assert len(got) == 1000 and len(set(got)) == 1000
        assert got == sorted(got, reverse=reverse)


async def test_map_grows_on_demand(tmp_path):
    srv = Server(make_config(tmp_path / "d", store={"map_size_mb": 1}))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        blob = "x" * 2000
        for i in range(30):
            events = [api.Event(identity=f"crm:{i}", type="t", data={"blob": blob, "n": n}) for n in range(50)]
            ingested = await srv.ingestion.ingest(msgspec.msgpack.encode(api.IngestEvents(events=events)))
            assert ingested.accepted == 50
        assert srv.store.map_resizes >= 2
        assert srv.store.default.counts()["events"] == 1500
        srv.request_stop()


async def test_schema_version_is_recorded_and_checked(tmp_path):
    path = tmp_path / "d"
    store = ProfileStore(path, clock=lambda: 0)
    store._open()
    store._close()
    env = lmdb.open(str(path), max_dbs=10)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        assert msgspec.msgpack.decode(txn.get(b"schema", db=meta)) == store_module.SCHEMA_VERSION
        txn.put(b"schema", msgspec.msgpack.encode(99), db=meta)
    env.close()
    with pytest.raises(SchemaError, match="schema version 99"):
        store._open()


async def test_retention_sweep_deletes_only_old_events(tmp_path):
    now = [1_800_000_000_000_000]
    day = 86_400_000_000
    store = ProfileStore(tmp_path / "d", clock=lambda: now[0], retention_us=10 * day, sweep_interval=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        events = [("crm:1", "old", now[0] - 9 * day, msgspec.Raw(b"\x80")), ("crm:1", "new", now[0], msgspec.Raw(b"\x80")),
                  ("crm:2", "old", now[0] - 8 * day - day // 2, msgspec.Raw(b"\x80")),
                  ("crm:2", "kept", now[0] - 7 * day, msgspec.Raw(b"\x80"))]
        await store.write(store_ops.ingest_events, [events])
        now[0] += 2 * day  # crm:1's old event is now 11 days old, crm:2 10.5 days: both expire, crm:2 kept is 9 days old
        assert await store.sweep(budget=1) == 2
        records, _ = store.default.read_events("crm:1", after=None, since_us=0, until_us=2**62, reverse=False, limit=10)
        assert [r.type for _, _, r in records] == ["new"]
        assert store.default.counts()["events"] == 2
        store.request_stop()


async def test_a_failing_op_does_not_fail_its_batch_neighbours(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        results: dict[str, object] = {}

        async def write(name, fn, *args):
            try:
                results[name] = await store.write(fn, *args)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertions
                results[name] = exc

        async with trio.open_nursery() as batch:
            batch.start_soon(write, "ok1", store_ops.upsert_profile, "crm:1", {"a": 1})
            batch.start_soon(write, "bad", store_ops.unlink_identity, "crm:missing")
            batch.start_soon(write, "ok2", store_ops.upsert_profile, "crm:2", {"b": 2})
        assert store.default.get_profile("crm:1").attributes == {"a": 1}
        assert store.default.get_profile("crm:2").attributes == {"b": 2}
        assert type(results["bad"]).__name__ == "NotFound"
        store.request_stop()


async def test_oversized_profile_is_refused(client):
    with pytest.raises(CallError) as info:
        await client.call(api.UpsertProfile(identity="crm:1", attributes={"big": "x" * 300_000}))
    assert info.value.status is Status.INVALID_ARGUMENT and "limit" in info.value.message


async def test_too_deep_attributes_are_refused(client):
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(CallError) as info:
        await client.call(api.UpsertProfile(identity="crm:1", attributes=deep))
    assert info.value.status is Status.INVALID_ARGUMENT and info.value.field.startswith("$.attributes.n")


def test_store_keys_sort_numerically():
    from server.profiles import keys as keys

    assert keys.seq_key(255) < keys.seq_key(256) and keys.seq_of(keys.seq_key(2**40)) == 2**40
    assert keys.pid_key(1) < keys.pid_key(2**32) and int.from_bytes(keys.pid_key(7), "big") == 7
    with pytest.raises(Exception, match="511"):
        keys.identity_key("crm:" + "é" * 300)


def test_data_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = ProfileStore(blocker / "sub", clock=lambda: 0)
    with pytest.raises(Exception, match="cannot open the data folder"):
        store._open()


def _modes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mode & 0o777 for path in [folder, *folder.iterdir()]}


async def test_the_data_folder_and_its_files_are_private_to_their_owner(tmp_path):
    """Profiles, tokens and credentials are in there: no other user of the machine may read them."""
    data = tmp_path / "data"

    async def serve_once() -> None:
        srv = Server(make_config(data))
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            async with open_client(srv.addresses[0]) as client:
                await client.call(api.UpsertProfile(identity="crm:1", attributes={"email": "ana@example.com"}))
            srv.request_stop()

    await serve_once()
    assert _modes(data) == {"data": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600, "pigeon.lock": 0o600}
    # a folder made by an older version, or by hand, is tightened when the server starts
    data.chmod(0o755)
    for name in ("data.mdb", "lock.mdb", "pigeon.lock"):
        (data / name).chmod(0o644)
    await serve_once()
    assert _modes(data) == {"data": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600, "pigeon.lock": 0o600}


class _LooseUpsert(api.Request[api.Profile]):
    """profiles.upsert without client-side typing, to send what a careless client might."""

    method = "profiles.upsert"
    identity: str
    attributes: dict


async def test_attribute_keys_must_be_strings_and_the_error_names_the_map(client):
    with pytest.raises(CallError) as info:
        await client.call(_LooseUpsert(identity="crm:1", attributes={1: "x"}))
    assert info.value.field == "$.attributes" and "keys must be strings" in info.value.message


async def test_an_over_long_link_names_the_link_field(client):
    await client.call(api.UpsertProfile(identity="crm:1"))
    with pytest.raises(CallError) as info:
        await client.call(api.LinkIdentity(identity="crm:1", link="crm:" + "é" * 300))
    assert info.value.field == "$.link"


async def test_events_are_logged_in_commit_order_and_indexed_by_profile_and_time(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1_800_000_000_000_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        data = msgspec.Raw(b"\x80")
        lasts = await store.write(
            store_ops.ingest_events, [[("crm:2", "b", 20, data), ("crm:1", "a", 30, data)], [("crm:1", "c", 10, data)]]
        )
        assert lasts == [2, 3]  # logged in commit order, indexed right after the commit
        page, _ = store.default.read_events("crm:1", after=None, since_us=0, until_us=2**62, reverse=False, limit=10)
        assert [(seq, ts, r.type) for seq, ts, r in page] == [(3, 10, "c"), (2, 30, "a")]  # by time
        store.request_stop()


async def test_the_index_is_rebuilt_from_the_log_when_the_store_opens(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1_800_000_000_000_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        data = msgspec.Raw(b"\x80")
        # out of time order on purpose, across two commits and two profiles
        await store.write(store_ops.ingest_events, [[("crm:1", "t", ts, data) for ts in (50, 10, 30)]])
        await store.write(store_ops.ingest_events, [[("crm:2", "t", 5, data), ("crm:1", "t", 20, data)]])
        before = store.default.read_events("crm:1", after=None, since_us=0, until_us=2**62, reverse=False, limit=100)[0]
        await store.write(store_ops.delete_profile, "crm:2")
        store.request_stop()
    assert [ts for _, ts, _ in before] == [10, 20, 30, 50]
    reopened = ProfileStore(tmp_path / "d", clock=lambda: 0)
    reopened._open()
    try:
        after = reopened.default.read_events("crm:1", after=None, since_us=0, until_us=2**62, reverse=False, limit=100)[0]
        assert after == before
        assert reopened.index.statistics()["events"] == 4 and reopened.index.statistics()["profiles"] == 1
    finally:
        reopened._close()


def test_the_index_takes_the_17_bytes_per_event_the_readme_says():
    """Two 8-byte numbers an event, and the arrays' spare room (README, Durability; the
    allocator's overhead and the LMDB pages in the resident size are measured by bench/ingest.py)."""
    from server.profiles.index import EventIndex

    index = EventIndex()
    pids = [i.to_bytes(8, "big") for i in range(1000)]
    index.add((pids[seq % 1000], 1_000 + seq, seq) for seq in range(200_000))
    stats = index.statistics()
    per_event = (stats["memory_bytes"] - 200 * stats["profiles"]) / stats["events"]
    assert stats["events"] == 200_000 and 15.5 <= per_event <= 17.5


def test_index_paging_cursors_in_both_directions():
    from server.profiles.index import EventIndex

    index = EventIndex()
    pid = b"\x00" * 7 + b"\x01"
    index.add([(pid, ts, seq) for seq, ts in enumerate([10, 20, 20, 30, 40, 50], start=1)])
    index.add([(pid, 15, 7)])  # older than the latest: inserted in time order
    forward, cursor, pages = [], None, 0
    while True:
        page, cursor = index.page(pid, after=cursor, since_us=15, until_us=40, reverse=False, limit=2)
        forward += page
        pages += 1
        if cursor is None:
            break
    assert [ts for _, ts in forward] == [15, 20, 20, 30, 40] and pages == 3
    backward, cursor = [], None
    while True:
        page, cursor = index.page(pid, after=cursor, since_us=0, until_us=2**62, reverse=True, limit=3)
        backward += page
        if cursor is None:
            break
    assert [ts for _, ts in backward] == [50, 40, 30, 20, 20, 15, 10]
    assert [seq for seq, _ in backward] == [6, 5, 4, 3, 2, 7, 1]
    index.remove([(pid, 20, 2), (pid, 99, 99)])
    assert [ts for _, ts in index.page(pid, after=None, since_us=0, until_us=2**62, reverse=False, limit=10)[0]] == [10, 15, 20, 30, 40, 50]
    assert [e[1] for e in index.expired(25)] == [10, 15, 20]
    index.drop(pid)
    assert index.statistics()["events"] == 0


async def test_a_backlog_is_committed_in_transactions_of_bounded_size(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1_800_000_000_000_000, max_commit_events=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        events = [("crm:1", "t", 1, msgspec.Raw(b"\x80"))] * 6
        ops = [store_module.WriteOp(store_ops.ingest_events, [events], weight=6) for _ in range(3)]
        for op in ops:  # all queued before the writer looks: one batch of 18 events
            store.send_nowait(op)
        assert [await op.future.wait() for op in ops] == [[6], [12], [18]]
        assert store.commits == 3  # 6 + 6 > 10: one op per commit
        heavy = store_module.WriteOp(store_ops.ingest_events, [events * 3], weight=18)
        assert await store.write_op(heavy) == [36]  # a single heavier op still commits, alone
        store.request_stop()


async def test_an_op_that_fails_unexpectedly_fails_alone_and_the_store_lives_on(tmp_path, caplog):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1)

    def buggy(w):
        raise KeyError("a bug in an op")

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with pytest.raises(Exception, match="internal error while writing") as info:
            await store.write(buggy)
        assert info.value.status == Status.INTERNAL
        assert (await store.write(store_ops.upsert_profile, "crm:1", {})).identities == ["crm:1"]
        assert "a bug in an op" in caplog.text
        store.request_stop()


async def test_unregister_never_falls_back_to_another_devices_fcm_token(client):
    await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="fcm", token="abc"))
    with pytest.raises(CallError) as info:
        await client.call(api.UnregisterToken(app=APP, token="ABC"))  # FCM tokens are case-sensitive
    assert info.value.status is Status.NOT_FOUND
    assert len((await client.call(api.GetProfile(identity="crm:1"))).registrations) == 1


async def test_stats_still_answer_while_the_store_restarts(tmp_path):
    srv = Server(make_config(tmp_path / "d", supervisor={"backoff_min_s": 2.0}))

    def broken_storage(w):
        raise lmdb.Error("simulated storage failure")

    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            with pytest.raises(Exception):
                await srv.store.write(broken_storage)
            stats = await c.call(api.GetStats())
            store = next(a for a in stats.actors if a.name == "store")
            assert store.state == "restarting" and "simulated storage failure" in store.last_error
            assert stats.store is None
            with trio.fail_after(10):
                while (await c.call(api.GetStats())).store is None:
                    await trio.sleep(0.05)
        srv.request_stop()


async def test_events_past_retention_are_hidden_at_once_and_swept_soon(tmp_path):
    now = [1_800_000_000_000_000]
    day = 86_400_000_000
    srv = Server(make_config(tmp_path / "d", store={"retention_days": 1, "sweep_interval_s": 0.05}), clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            await c.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="old")]))
            now[0] += 2 * day
            async with c.stream(api.ListEvents(identity="crm:1")) as items:
                assert [e async for e in items] == []  # hidden even before the sweep
            with trio.fail_after(10):
                while (await c.call(api.GetStats())).store.events:
                    await trio.sleep(0.05)
        srv.request_stop()


async def test_invalidating_a_token_follows_the_providers_timestamp(tmp_path):
    now = [1_800_000_000_000_000]
    store = ProfileStore(tmp_path / "d", clock=lambda: now[0])
    app, dead, renewed = "com.acme.app", "ab" * 32, "cd" * 32
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write(store_ops.register_token, "crm:1", app, "apns", dead)
        await store.write(store_ops.register_token, "crm:1", app, "apns", renewed)
        since = now[0] + 500  # the provider learnt both were dead after they were registered...
        now[0] += 1_000
        await store.write(store_ops.register_token, "crm:1", app, "apns", renewed)  # ...and one came back
        items = [(app, dead, "Unregistered", since), (app, renewed, "Unregistered", since),
                 (app, "ef" * 32, "BadDeviceToken", None), (app, "x" * 600, "BadDeviceToken", None)]
        assert await store.write(store_ops.invalidate_tokens, items) == ["marked", "kept", "unknown", "unknown"]
        assert await store.write(store_ops.invalidate_tokens, items[:1]) == ["already"]
        regs = {r.token: r for r in store.default.get_profile("crm:1").registrations}
        assert (regs[dead].state, regs[dead].invalid_reason, regs[dead].invalid_at) == ("invalid", "Unregistered", now[0])
        assert regs[renewed].state == "active"
        store.request_stop()


async def test_app_versions_are_never_reused(tmp_path):
    from server.channels import AppRecord

    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        first = await store.write(app_ops.put_app, AppRecord(app="com.acme.app"))
        await store.write(app_ops.put_app, AppRecord(app="com.other.app"))
        await store.write(app_ops.delete_app, "com.acme.app")
        again = await store.write(app_ops.put_app, AppRecord(app="com.acme.app"))
        assert (first.version, again.version) == (1, 3)
        assert app_ops.get_app(store.default, "com.acme.app").version == 3
        assert [a.app for a in app_ops.list_apps(store.default)] == ["com.acme.app", "com.other.app"]
        with pytest.raises(Exception, match="no app 'com.gone.app'"):
            await store.write(app_ops.delete_app, "com.gone.app")
        store.request_stop()


async def test_a_refused_write_leaves_nothing_for_the_garbage_collector(tmp_path):
    """The refusal of an op held the writer's frame in its traceback, and the frame held the
    list of results, which held the refusal: a refused 3.8 MB profiles.patch kept 7.5 MB alive
    until a full collection (300 MB for 40 of them)."""
    import gc
    import weakref

    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        gc.collect()
        gc.disable()
        try:
            with pytest.raises(InvalidArgument) as info:
                await store.write(store_ops.patch_profile, "crm:1", {"blob": "x" * 400_000}, True)
            refusal = weakref.ref(info.value)
            del info
            assert refusal() is None, [type(r).__name__ for r in gc.get_referrers(refusal())]
            assert gc.collect() == 0
        finally:
            gc.enable()
        store.request_stop()


async def test_a_profile_missing_behind_its_index_is_an_internal_error_in_the_log(server, client, caplog):
    """A damaged store (an identity naming a profile record that is gone) is not a refusal the
    caller could fix: the call fails as INTERNAL and the server logs it (the move of issue 12
    turned it into a silent SchemaError for a while)."""
    await client.call(api.UpsertProfile(identity="crm:7", attributes={"a": 1}))
    store = server.store
    with store.env.begin(write=True) as txn:
        pid = txn.get(b"crm:7", db=store.default.db("identities"))
        assert pid is not None and txn.delete(pid, db=store.default.db("profiles"))
    for request in (api.GetProfile(identity="crm:7"), api.PatchProfile(identity="crm:7", patch={"b": 2})):
        caplog.clear()
        with pytest.raises(CallError) as info:
            await client.call(request)
        assert info.value.status == Status.INTERNAL
        assert "missing from the store" in caplog.text
