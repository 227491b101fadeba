"""API keys (issue 13, access): the handshake, the scopes of every method, revocation, the
first admin key, the listen rule and the slowing down of repeated failures, on real servers."""

from __future__ import annotations

import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from protocols import api
from protocols.errors import CallError, ConnectionClosed, Status
from protocols.trio_client import Client, open_client
from server import Server
from server.access.keys import admin_key_path
from server.access.service import Throttle
from server.runtime.errors import ConfigError

from .conftest import make_config, self_signed_certificate

#: What each method needs (PROTOCOL.md 5.1), written here apart from the server's registrations.
NEEDS = {
    "server.health": "public",
    "server.stats": "read", "reports.get": "read", "reports.watch": "read",
    "tokens.register": "ingest", "tokens.unregister": "ingest", "consent.set": "ingest", "events.ingest": "ingest",
    **{m: "operator" for m in ("profiles.get", "profiles.upsert", "profiles.patch", "profiles.delete", "profiles.link",
                               "profiles.unlink", "events.list", "push.send", "messages.send")},
    **{m: "admin" for m in ("apps.register_ios", "apps.register_android", "apps.get", "apps.list", "apps.delete",
                            "configs.publish", "configs.get", "configs.list", "messages.publish", "messages.get",
                            "messages.list", "messages.preview", "keys.create", "keys.list", "keys.revoke", "sandboxes.create", "sandboxes.list",
                            "journeys.publish", "journeys.get", "journeys.list", "journeys.close", "journeys.stop",
                            "journeys.pause", "journeys.resume", "journeys.simulate", "journeys.trace",
                            "secrets.rotate")},
}
#: The scopes each key's scope grants.
GRANTS = {"admin": {"admin", "operator", "ingest", "read"}, "operator": {"operator", "ingest", "read"},
          "ingest": {"ingest"}, "read": {"read"}}


def probe(method: str) -> api.Request[Any]:
    """A request of ``method`` with an empty body: refused for its scope before it is decoded,
    or else answered (often INVALID_ARGUMENT, which proves the scope check passed)."""
    cls = type("Probe", (api.Request,), {"method": method})
    return cls()  # type: ignore[no-any-return]


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[Server]:
    """A server with API keys on (its first admin key is in its admin key file)."""
    srv = Server(make_config(tmp_path / "data", auth="keys"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        srv.request_stop()


def admin_key(srv: Server) -> str:
    return admin_key_path(srv.config.data).read_text().strip()


async def make_key(srv: Server, *scopes: str, name: str = "") -> str:
    async with open_client(srv.addresses[0], api_key=admin_key(srv)) as admin:
        return (await admin.call(api.CreateKey(scopes=list(scopes), name=name))).key  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the handshake


async def test_without_a_key_only_health_answers(keyed: Server) -> None:
    async with open_client(keyed.addresses[0], api_key="") as client:
        assert (await client.call(api.GetHealth())).status == "serving"
        with pytest.raises(CallError) as refused:
            await client.call(api.GetProfile(identity="crm:1"))
        assert refused.value.status is Status.UNAUTHENTICATED
        assert "profiles.get needs an API key with the operator scope" in refused.value.message
        assert (await client.call(api.GetHealth())).status == "serving"  # the connection stays open


@pytest.mark.parametrize("key", ["nonsense", "pgn_" + "A" * 43, "x" * 5000, "pgn_\u00e9"])
async def test_a_key_that_is_not_valid_is_refused_in_the_handshake(keyed: Server, key: str) -> None:
    with pytest.raises(ConnectionClosed) as refused:
        async with open_client(keyed.addresses[0], api_key=key):
            pass
    assert refused.value.status is Status.UNAUTHENTICATED
    message = str(refused.value)
    assert "not valid" in message and "pgn_" not in message and key not in message
    assert admin_key(keyed)[:12] not in message


async def test_a_created_key_opens_a_connection_and_is_listed_without_its_secret(keyed: Server) -> None:
    key = await make_key(keyed, "ingest", name="ios-app")
    assert key.startswith("pgn_") and len(key) == 47
    async with open_client(keyed.addresses[0], api_key=key) as client:
        await client.call(api.RegisterToken(identity="crm:1", app="com.acme", platform="fcm", token="t1"))
    async with open_client(keyed.addresses[0], api_key=admin_key(keyed)) as admin:
        listed = (await admin.call(api.ListKeys())).keys
    assert [(k.scopes, k.name, k.sandbox) for k in listed] == [(["admin"], "first admin key", "default"),
                                                                (["ingest"], "ios-app", "default")]
    assert listed[1].id == key[:12] and key not in msgspec.json.encode(listed).decode()
    assert listed[1].last_used is not None  # in memory at once, written to LMDB once a minute


async def test_the_pepper_is_sealed_and_keys_are_stored_hashed(keyed: Server) -> None:
    key = await make_key(keyed, "read")
    with keyed.store.env.begin() as txn:
        stored = b"".join(bytes(k) + bytes(v) for k, v in txn.cursor(db=keyed.store.db("keys")))
    assert key.encode() not in stored and key[12:].encode() not in stored
    assert keyed.access.pepper not in stored


# ---------------------------------------------------------------------------------------------
# scopes, for every method


async def test_every_method_is_allowed_or_refused_by_the_scope_it_needs(keyed: Server) -> None:
    assert set(NEEDS) == set(api.METHODS)
    keys = {scope: await make_key(keyed, scope) for scope in ("operator", "ingest", "read")}
    keys["admin"] = admin_key(keyed)
    for scope, key in keys.items():
        async with open_client(keyed.addresses[0], api_key=key) as client:
            for method, needs in sorted(NEEDS.items()):
                if api.METHODS[method].streaming:
                    continue  # reports.watch: below
                allowed = needs == "public" or needs in GRANTS[scope]
                try:
                    await client.call(probe(method))
                    status = None
                except CallError as exc:
                    status, message = exc.status, exc.message
                if allowed:
                    assert status not in (Status.PERMISSION_DENIED, Status.UNAUTHENTICATED), (scope, method)
                else:
                    assert status is Status.PERMISSION_DENIED, (scope, method, status)
                    assert message.startswith(f"{method} needs the {needs} scope, which the API key of this "
                                              f"connection does not have (it has "), message
                    assert "pgn_" not in message


async def test_a_read_key_watches_reports_and_an_ingest_key_cannot(keyed: Server) -> None:
    read, ingest = await make_key(keyed, "read"), await make_key(keyed, "ingest")
    async with open_client(keyed.addresses[0], api_key=read) as client:
        async with client.stream(api.WatchReport()) as reports:
            async for report in reports:
                assert report.window == "all_time"
                break
    async with open_client(keyed.addresses[0], api_key=ingest) as client:
        with pytest.raises(CallError) as refused:
            async with client.stream(api.WatchReport()) as reports:
                async for _ in reports:
                    pass
        assert refused.value.status is Status.PERMISSION_DENIED


async def test_an_ingest_key_cannot_read_a_profile_nor_a_read_key_send(keyed: Server) -> None:
    """The issue's examples, with real requests."""
    ingest, read = await make_key(keyed, "ingest"), await make_key(keyed, "read")
    async with open_client(keyed.addresses[0], api_key=ingest) as client:
        await client.call(api.IngestEvents(events=[api.Event(identity="crm:7", type="app.open")]))
        with pytest.raises(CallError, match="profiles.get needs the operator scope") as refused:
            await client.call(api.GetProfile(identity="crm:7"))
        assert refused.value.status is Status.PERMISSION_DENIED
    async with open_client(keyed.addresses[0], api_key=read) as client:
        with pytest.raises(CallError, match="push.send needs the operator scope"):
            await client.call(api.SendPush(app="com.acme", identity="crm:7", content=api.PushContent(title="x")))
        await client.call(api.GetStats())


# ---------------------------------------------------------------------------------------------
# revocation


async def test_revocation_closes_the_key_s_open_connections(keyed: Server) -> None:
    key = await make_key(keyed, "operator")
    async with open_client(keyed.addresses[0], api_key=key) as first, \
            open_client(keyed.addresses[0], api_key=key) as second, \
            open_client(keyed.addresses[0], api_key=admin_key(keyed)) as admin:
        await first.call(api.GetStats())
        watch_error: list[BaseException] = []

        async def watch() -> None:
            try:
                async with second.stream(api.WatchReport(interval_s=0.1)) as reports:
                    async for _ in reports:
                        pass
            except (CallError, ConnectionClosed) as exc:
                watch_error.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.sleep(0.2)
                revoked = await admin.call(api.RevokeKey(id=key[:12]))
                assert revoked.connections_closed == 2
        assert watch_error and watch_error[0].status is Status.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "revoked" in str(watch_error[0])
        with pytest.raises((ConnectionClosed, CallError)) as closed:
            await first.call(api.GetStats())
        assert closed.value.status is Status.UNAUTHENTICATED
        assert (await admin.call(api.GetStats())).version  # another key's connection is untouched
    with pytest.raises(ConnectionClosed) as refused:
        async with open_client(keyed.addresses[0], api_key=key):
            pass
    assert refused.value.status is Status.UNAUTHENTICATED


async def test_the_last_admin_key_cannot_be_revoked(keyed: Server) -> None:
    async with open_client(keyed.addresses[0], api_key=admin_key(keyed)) as admin:
        with pytest.raises(CallError, match="last key with the admin scope") as refused:
            await admin.call(api.RevokeKey(id=admin_key(keyed)[:12]))
        assert refused.value.status is Status.FAILED_PRECONDITION
        with pytest.raises(CallError) as missing:
            await admin.call(api.RevokeKey(id="pgn_AAAAAAAA"))
        assert missing.value.status is Status.NOT_FOUND
        second = (await admin.call(api.CreateKey(scopes=["admin"]))).key
        await admin.call(api.RevokeKey(id=admin_key(keyed)[:12]))
    async with open_client(keyed.addresses[0], api_key=second) as admin:
        assert [k.id for k in (await admin.call(api.ListKeys())).keys] == [second[:12]]


# ---------------------------------------------------------------------------------------------
# the first admin key


async def _run_once(config: Any) -> list[api.KeyInfo]:
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        infos = [record.info() for record in srv.access.list("default")]
        srv.request_stop()
    return infos


async def test_the_first_start_writes_an_admin_key_file_that_the_second_reuses(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", auth="keys")
    first = await _run_once(config)
    path = tmp_path / "data.admin-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert [k.id for k in first] == [key[:12]]
    assert await _run_once(config) == first and path.read_text().strip() == key
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0], api_key=key) as admin:
            assert len((await admin.call(api.ListKeys())).keys) == 1
        srv.request_stop()


async def test_pigeon_admin_key_gives_the_admin_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "pgn_" + "k" * 43
    monkeypatch.setenv("PIGEON_ADMIN_KEY", key)
    srv = Server(make_config(tmp_path / "data", auth="keys"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0], api_key=key) as admin:
            assert [k.name for k in (await admin.call(api.ListKeys())).keys] == ["from PIGEON_ADMIN_KEY"]
        srv.request_stop()
    assert not (tmp_path / "data.admin-key").exists()


async def test_the_key_of_pigeon_admin_key_is_not_revoked_while_it_would_come_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack review: revoking the PIGEON_ADMIN_KEY key worked until the next start stored
    it again (a leaked key "revoked" came back). It is refused while the variable names it."""
    key = "pgn_" + "k" * 43
    monkeypatch.setenv("PIGEON_ADMIN_KEY", key)
    srv = Server(make_config(tmp_path / "data", auth="keys"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0], api_key=key) as admin:
            other = (await admin.call(api.CreateKey(scopes=["admin"], name="second"))).key
        async with open_client(srv.addresses[0], api_key=other) as admin:
            with pytest.raises(CallError) as info:
                await admin.call(api.RevokeKey(id=key[:12]))
            assert info.value.status == Status.FAILED_PRECONDITION and "PIGEON_ADMIN_KEY" in info.value.message
        srv.request_stop()
    monkeypatch.delenv("PIGEON_ADMIN_KEY")
    srv = Server(make_config(tmp_path / "data", auth="keys"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0], api_key=other) as admin:
            await admin.call(api.RevokeKey(id=key[:12]))
        srv.request_stop()


async def test_a_malformed_pigeon_admin_key_stops_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIGEON_ADMIN_KEY", "hunter2")
    srv = Server(make_config(tmp_path / "data", auth="keys"))
    with pytest.RaisesGroup(pytest.RaisesExc(ConfigError, match="PIGEON_ADMIN_KEY is not an API key"),
                            flatten_subgroups=True, allow_unwrapped=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)


async def test_no_server_names_a_file_and_the_cli_sends_only_what_is_a_key(keyed: Server, tmp_path: Path) -> None:
    """An attack review found the CLI reading whatever path a server named in server.health
    and sending it as its key (an SSH key, say, to a process on the CLI's port), and any file
    a configuration named: health names no file now, and a key file must hold a key."""
    from server.access.keys import read_key_file

    async with open_client(keyed.addresses[0], api_key="") as client:
        health = await client.call(api.GetHealth())
    assert "admin_key_file" not in msgspec.structs.asdict(health)
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n")
    with pytest.raises(ConfigError, match="does not hold a Pigeon API key"):
        read_key_file(secret)
    assert read_key_file(admin_key_path(keyed.config.data)) == admin_key(keyed)


async def test_without_keys_every_method_is_open(server: Server, client: Client) -> None:
    await client.call(api.ListKeys())


async def test_an_ingest_key_learns_nothing_about_other_profiles_from_tokens(keyed: Server) -> None:
    """The attack review: with an ingest key (the key an app embeds), tokens.unregister named
    the identity owning a token (and NOT_FOUND told which tokens exist), tokens.register named
    the profile a token moved from, whether the profile existed, and the tokens it evicted."""
    operator = await make_key(keyed, "operator")
    ingest = await make_key(keyed, "ingest")
    async with open_client(keyed.addresses[0], api_key=operator) as op:
        await op.call(api.RegisterToken(identity="email:victim@corp.com", app="com.acme.app", platform="fcm", token="VICTIM"))
    async with open_client(keyed.addresses[0], api_key=ingest) as app:
        moved = await app.call(api.RegisterToken(identity="crm:attacker", app="com.acme.app", platform="fcm", token="VICTIM"))
        assert (moved.moved_from, moved.created_profile, moved.evicted) == (None, False, [])
        assert (await app.call(api.UnregisterToken(app="com.acme.app", token="VICTIM"))).identity == ""
        assert (await app.call(api.UnregisterToken(app="com.acme.app", token="NEVER-SEEN"))).identity == ""
    async with open_client(keyed.addresses[0], api_key=operator) as op:  # an operator still learns it all
        await op.call(api.RegisterToken(identity="email:victim@corp.com", app="com.acme.app", platform="fcm", token="T2"))
        moved = await op.call(api.RegisterToken(identity="crm:other", app="com.acme.app", platform="fcm", token="T2"))
        assert moved.moved_from == "email:victim@corp.com" and moved.created_profile
        assert (await op.call(api.UnregisterToken(app="com.acme.app", token="T2"))).identity == "crm:other"
        with pytest.raises(CallError) as info:
            await op.call(api.UnregisterToken(app="com.acme.app", token="NEVER-SEEN"))
        assert info.value.status == Status.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# the listen rule


@pytest.mark.parametrize(("listen", "settings", "error"), [
    ("0.0.0.0:0", {"auth": "none"}, 'auth = "none" lets anyone who reaches it call every method'),
    ("0.0.0.0:0", {}, "0.0.0.0:0 is not a loopback address and TLS is off"),
    ("[::]:0", {}, "[::]:0 is not a loopback address and TLS is off"),
    ("10.1.2.3:7600", {"auth": "none", "insecure_plaintext_network": True}, 'auth = "none"'),
])
def test_beyond_loopback_the_server_wants_keys_and_tls(tmp_path: Path, listen: str, settings: dict[str, Any],
                                                       error: str) -> None:
    values = {"auth": "keys", **settings}
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        Server(make_config(tmp_path / "data", listen=[listen], **values))
    assert not (tmp_path / "data").exists()


def test_loopback_unix_and_tls_addresses_are_allowed(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    Server(make_config(tmp_path / "a", listen=["127.0.0.1:0", "[::1]:0", "localhost:0", f"unix:{tmp_path}/s"]))
    Server(make_config(tmp_path / "b", listen=["0.0.0.0:0"], auth="keys", tls_cert=str(cert), tls_key=str(key)))
    Server(make_config(tmp_path / "c", listen=["0.0.0.0:0"], auth="keys", insecure_plaintext_network=True))


async def test_beyond_loopback_with_tls_a_key_opens_a_connection(tmp_path: Path) -> None:
    import ssl

    cert, key_file = self_signed_certificate(tmp_path)
    srv = Server(make_config(tmp_path / "data", listen=["0.0.0.0:0"], auth="keys", tls_cert=str(cert),
                             tls_key=str(key_file)))
    context = ssl.create_default_context(cafile=str(cert))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        port = srv.addresses[0].rsplit(":", 1)[1]
        async with open_client(f"127.0.0.1:{port}", ssl_context=context, api_key=admin_key(srv)) as client:
            assert (await client.call(api.ListKeys())).keys
        with pytest.raises(ConnectionClosed) as refused:
            async with open_client(f"127.0.0.1:{port}", ssl_context=context, api_key="pgn_" + "q" * 43):
                pass
        assert refused.value.status is Status.UNAUTHENTICATED
        srv.request_stop()


# ---------------------------------------------------------------------------------------------
# slowing down repeated failures


def test_the_throttle_grows_caps_decays_and_forgets() -> None:
    now = [0.0]
    throttle = Throttle(base=0.05, max_delay=4.0, half_life=30.0, max_hosts=3, clock=lambda: now[0])
    delays = [throttle.failed("10.0.0.1") for _ in range(12)]
    assert delays[0] == 0 and delays[1] == pytest.approx(0.05)
    assert all(b >= a for a, b in zip(delays, delays[1:])) and delays[-1] == 4.0
    assert throttle.failed("10.0.0.2") == 0  # another host pays nothing
    now[0] += 600  # twenty half-lives without a failure
    assert throttle.failed("10.0.0.1") == 0
    for host in ("a", "b", "c", "d"):
        throttle.failed(host)
    assert len(throttle) == 3 and throttle.score("10.0.0.1") == 0


def test_an_ipv6_host_counts_as_its_64() -> None:
    """The attack review: a host with a /64 walked around the throttle, an address a try."""
    throttle = Throttle(base=0.05, max_delay=4.0, half_life=30.0, clock=lambda: 0.0)
    assert [throttle.failed("2001:db8::1") for _ in range(2)] == [0, pytest.approx(0.05)]
    assert throttle.failed("2001:db8::ffff:1") == pytest.approx(0.1)  # the same /64
    assert throttle.failed("2001:db8:0:1::1") == 0  # the next /64: another host
    assert throttle.failed("::ffff:10.0.0.1") == 0 and throttle.failed("::ffff:10.0.0.2") == 0  # IPv4, mapped


async def test_a_flood_of_bad_keys_from_one_host_is_not_a_flood_in_the_log(keyed: Server,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The attack review: each bad hello wrote a WARNING (3,950 lines in 4 s from one host).
    A host's refusals are logged until it is slowed down (the first two), then only counted."""
    with trio.fail_after(30):
        for _ in range(5):
            with pytest.raises(ConnectionClosed):
                async with open_client(keyed.addresses[0], api_key="pgn_" + "B" * 43):
                    pass
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "its API key is not valid" in r.getMessage()]
    assert len(warnings) == 2 and keyed.access.refused == 5


async def test_repeated_refusals_from_one_host_are_slowed_down_and_honest_handshakes_are_not(keyed: Server) -> None:
    key = await make_key(keyed, "read")

    async def refused() -> float:
        started = time.perf_counter()
        with pytest.raises(ConnectionClosed):
            async with open_client(keyed.addresses[0], api_key="pgn_" + "B" * 43):
                pass
        return time.perf_counter() - started

    async def welcomed() -> float:
        started = time.perf_counter()
        async with open_client(keyed.addresses[0], api_key=key):
            pass
        return time.perf_counter() - started

    with trio.fail_after(60):
        first = await refused()
        for _ in range(8):
            await refused()
        later = await refused()
        honest = await welcomed()
    # Measured loosely (a noisy machine): the 10th refusal waits seconds, the first and an
    # honest handshake from the same host do not.
    assert first < 0.5 and honest < 0.5
    assert later >= 1.0, (first, later)
    assert keyed.access.refused == 10


# ---------------------------------------------------------------------------------------------
# keys kept across restarts and master key rotations; the asyncio client


async def test_last_use_survives_a_restart_and_keys_survive_a_master_key_rotation(tmp_path: Path) -> None:
    from server.profiles import sealing

    config = make_config(tmp_path / "data", auth="keys")
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        key = await make_key(srv, "read", name="dashboard")
        async with open_client(srv.addresses[0], api_key=key) as client:
            await client.call(api.GetStats())
        await sealing.rotate(srv.store)  # the pepper is re-sealed under the new master key
        srv.request_stop()
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0], api_key=key) as client:
            await client.call(api.GetStats())
        listed = {record.name: record for record in srv.access.list("default")}
        assert listed["dashboard"].last_used_us > 0  # written at the stop, read back at the start
        srv.request_stop()


def test_the_asyncio_client_takes_a_key_from_its_argument_or_pigeon_api_key(
    spawn_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from protocols import asyncio_client

    server = spawn_server(auth="keys")

    async def stats(**kwargs: Any) -> api.Stats:
        async with asyncio_client.open_client(server.address, **kwargs) as client:
            return await client.call(api.GetStats())

    assert asyncio.run(stats(api_key=server.admin_key)).version
    monkeypatch.setenv("PIGEON_API_KEY", server.admin_key)
    assert asyncio.run(stats()).version
    monkeypatch.setenv("PIGEON_API_KEY", "pgn_" + "z" * 43)
    with pytest.raises(ConnectionClosed) as refused:
        asyncio.run(stats())
    assert refused.value.status is Status.UNAUTHENTICATED
    with pytest.raises(CallError) as no_key:
        asyncio.run(stats(api_key=""))  # an explicit empty key: none, whatever the environment says
    assert no_key.value.status is Status.UNAUTHENTICATED
