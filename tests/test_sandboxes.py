"""Sandboxes: two worlds in one server. Keys of sandbox ``dev`` try to read, write, send,
report, watch and stream across to ``default`` (and back), through the real server with keys
on, the mock FCM over TLS and HTTP/2, and the real LMDB; they find nothing."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest
import trio

from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import CallError, ConnectionClosed, Status
from protocols.trio_client import Client, open_client
from server import Server
from server.access.keys import admin_key_path
from server.delivery import apps
from server.profiles.store import ProfileStore
from server.runtime.errors import StorageError

from .conftest import make_config

APP = "com.acme.shop"
ACCOUNTS = {"default": ServiceAccount.generate("acme-push"), "dev": ServiceAccount.generate("acme-dev")}


async def admin(mock: Any, name: str, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args))


def config(tmp_path: Path, fcm: Any, **overrides: Any) -> Any:
    return make_config(tmp_path / "data", fcm={"url": fcm.url, "token_uri": fcm.token_uri, "ca_file": str(fcm.ca_file),
                                               "retry_min_s": 0.05}, **overrides)


@pytest.fixture
async def srv(tmp_path: Path, fcm: Any) -> AsyncIterator[Server]:
    """A server with keys on, and sandbox ``dev`` beside ``default``."""
    for project, account in (("acme-push", ACCOUNTS["default"]), ("acme-dev", ACCOUNTS["dev"])):
        await admin(fcm, "set_project", project, [account.spec()])
    await admin(fcm, "clear_accepted")
    server = Server(config(tmp_path, fcm, auth="keys"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with connect(server, root_key(server)) as root:
            assert (await root.call(api.CreateSandbox(name="dev"))).name == "dev"
            server.dev_admin = (await root.call(api.CreateKey(scopes=["admin"], sandbox="dev"))).key  # type: ignore[attr-defined]
        yield server
        server.request_stop()


def root_key(server: Server) -> str:
    return admin_key_path(server.config.data).read_text().strip()


def connect(server: Server, key: str, sandbox: str | None = None) -> Any:
    return open_client(server.addresses[0], api_key=key, sandbox=sandbox)


async def refused(client: Client, request: api.Request[Any]) -> CallError:
    with pytest.raises(CallError) as caught:
        await client.call(request)
    return caught.value


async def world(client: Client, sandbox: str, token: str, title: str) -> None:
    """The same app id, identity and message in each sandbox, with other credentials,
    attributes, token and content."""
    await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNTS[sandbox].info("")))
    await client.call(api.UpsertProfile(identity="crm:1", attributes={"sandbox": sandbox}))
    await client.call(api.RegisterToken(identity="crm:1", app=APP, platform="fcm", token=token))
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type=f"{sandbox}.opened")]))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=[APP], platforms=["android"])))
    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="cart", channel="push", content=api.MessageContent(title=title, body="{{ profile.sandbox }}"))))


# ---------------------------------------------------------------------------------------------
# keys and sandboxes


async def test_sandboxes_are_made_and_listed_by_an_admin_of_default_only(srv: Server) -> None:
    async with connect(srv, root_key(srv)) as root, connect(srv, srv.dev_admin) as dev:  # type: ignore[attr-defined]
        listed = (await root.call(api.ListSandboxes())).sandboxes
        assert [s.name for s in listed] == ["default", "dev"]
        assert (await refused(root, api.CreateSandbox(name="dev"))).status is Status.ALREADY_EXISTS
        for request in (api.CreateSandbox(name="prod"), api.ListSandboxes(), api.RotateSecrets(),
                        api.CreateKey(scopes=["admin"], sandbox="default"), api.ListKeys(sandbox="default")):
            denied = await refused(dev, request)
            assert denied.status is Status.PERMISSION_DENIED, request
            assert "admin key of sandbox default" in denied.message
        # Keys: each admin lists its own sandbox's; default's may look into dev's.
        dev_key = (await dev.call(api.CreateKey(scopes=["ingest"], name="dev-app"))).info
        assert dev_key.sandbox == "dev"
        assert [k.name for k in (await dev.call(api.ListKeys())).keys] == ["", "dev-app"]
        assert [k.sandbox for k in (await root.call(api.ListKeys())).keys] == ["default"]
        assert [k.name for k in (await root.call(api.ListKeys(sandbox="dev"))).keys] == ["", "dev-app"]
        # dev cannot revoke default's key: told exactly what an unknown id is told.
        root_id = root_key(srv)[:12]
        gone = await refused(dev, api.RevokeKey(id=root_id))
        unknown = await refused(dev, api.RevokeKey(id="pgn_AAAAAAAA"))
        assert (gone.status, gone.message.replace(root_id, "ID")) == (unknown.status, unknown.message.replace("pgn_AAAAAAAA", "ID"))
        assert gone.status is Status.NOT_FOUND
        assert (await root.call(api.RevokeKey(id=dev_key.id))).id == dev_key.id  # default's admin may
        assert (await refused(root, api.CreateKey(scopes=["read"], sandbox="nope"))).status is Status.NOT_FOUND


async def test_a_key_works_in_its_own_sandbox_only(srv: Server) -> None:
    messages = []
    for named in ("default", "nope", "other-one"):
        with pytest.raises(ConnectionClosed) as caught:
            async with connect(srv, srv.dev_admin, sandbox=named):  # type: ignore[attr-defined]
                pass
        assert caught.value.status is Status.UNAUTHENTICATED
        messages.append(str(caught.value).replace(named, "X"))
    assert len(set(messages)) == 1  # nothing said of which sandboxes exist
    async with connect(srv, srv.dev_admin, sandbox="dev") as dev:  # type: ignore[attr-defined]
        assert (await dev.call(api.ListApps())).apps == []


# ---------------------------------------------------------------------------------------------
# data


async def test_the_same_identity_app_and_message_in_two_sandboxes_are_unrelated(srv: Server, fcm: Any) -> None:
    await admin(fcm, "set_tokens", "acme-push", {"tok-default": {}})
    await admin(fcm, "set_tokens", "acme-dev", {"tok-dev": {}})
    async with connect(srv, root_key(srv)) as root, connect(srv, srv.dev_admin) as dev:  # type: ignore[attr-defined]
        await world(root, "default", "tok-default", "Hello from prod")
        await world(dev, "dev", "tok-dev", "Hello from dev")
        await root.call(api.UpsertProfile(identity="crm:2", attributes={"only": "default"}))

        # reads see their own sandbox's records
        assert (await dev.call(api.GetProfile(identity="crm:1"))).attributes == {"sandbox": "dev"}
        assert (await root.call(api.GetProfile(identity="crm:1"))).attributes == {"sandbox": "default"}
        assert [r.token for r in (await dev.call(api.GetProfile(identity="crm:1"))).registrations] == ["tok-dev"]
        hidden = await refused(dev, api.GetProfile(identity="crm:2"))
        absent = await refused(dev, api.GetProfile(identity="crm:3"))
        assert (hidden.status, hidden.message.replace("crm:2", "X")) == (absent.status, absent.message.replace("crm:3", "X"))
        async with dev.stream(api.ListEvents(identity="crm:1")) as events:
            assert [e.type async for e in events] == ["dev.opened"]
        assert [a.android.project_id for a in (await dev.call(api.ListApps())).apps] == ["acme-dev"]
        assert (await dev.call(api.GetMessage(id="cart"))).version == 1  # its own first version
        # writes change their own sandbox only
        await dev.call(api.PatchProfile(identity="crm:1", patch={"touched": True}))
        assert (await root.call(api.GetProfile(identity="crm:1"))).attributes == {"sandbox": "default"}
        assert (await refused(dev, api.DeleteProfile(identity="crm:2"))).status is Status.NOT_FOUND
        assert (await root.call(api.GetProfile(identity="crm:2"))).attributes == {"only": "default"}
        assert (await refused(dev, api.UnregisterToken(app=APP, token="tok-default"))).status is Status.NOT_FOUND
        assert [r.state for r in (await root.call(api.GetProfile(identity="crm:1"))).registrations] == ["active"]

        # sends go out with the sandbox's own credentials, content and tokens
        sent = await dev.call(api.SendMessage(id="cart", identities=["crm:1", "crm:2"]))
        assert (sent.delivered, sent.unknown_identities) == (1, ["crm:2"])
        pushed = await dev.call(api.SendPush(app=APP, identity="crm:1", content=api.PushContent(title="direct")))
        assert [o.token for o in pushed.outcomes] == ["tok-dev"]
        assert (await refused(dev, api.SendPush(app=APP, identity="crm:2", content=api.PushContent(title="x")))
                ).status is Status.NOT_FOUND
        accepted = await admin(fcm, "accepted")
        assert {(a["project"], a["token"], a["message"]["notification"]["title"]) for a in accepted} == {
            ("acme-dev", "tok-dev", "Hello from dev"), ("acme-dev", "tok-dev", "direct")}
        assert accepted[0]["message"]["notification"]["body"] == "dev"

        # reports count each sandbox's own
        assert (await root.call(api.GetReport(message="cart"))).totals == {}
        dev_report = await dev.call(api.GetReport(message="cart"))
        assert dev_report.totals == {"targeted": 1, "sent": 1, "delivered": 1}
        stats = await dev.call(api.GetStats())
        assert stats.store is not None and (stats.store.profiles, stats.store.events) == (1, 1)
        assert all(actor.details == {} for actor in stats.actors)  # other sandboxes' apps and counts
        assert (await root.call(api.GetStats())).store.profiles == 2  # type: ignore[union-attr]


async def test_reports_and_their_watch_count_the_caller_s_sandbox_only(srv: Server, fcm: Any) -> None:
    await admin(fcm, "set_tokens", "acme-push", {"tok-default": {}})
    await admin(fcm, "set_tokens", "acme-dev", {"tok-dev": {}})
    async with connect(srv, root_key(srv)) as root, connect(srv, srv.dev_admin) as dev:  # type: ignore[attr-defined]
        await world(root, "default", "tok-default", "prod")
        await world(dev, "dev", "tok-dev", "dev")
        async with dev.stream(api.WatchReport(message="cart", interval_s=0.1)) as watch:
            seen = [await watch.__anext__()]
            await root.call(api.SendMessage(id="cart", identities=["crm:1"]))
            # an open reported in dev, with the envelope of default's message, counts in dev
            opened = api.Event(identity="crm:1", type="pushTracking.applicationOpened",
                               data={"_p": {"m": "cart", "v": 1, "x": "0" * 16}})
            await dev.call(api.IngestEvents(events=[opened]))
            with trio.fail_after(10):
                async for report in watch:
                    seen.append(report)
                    if report.totals.get("opened"):
                        break
        assert seen[0].totals == {}
        assert all(report.totals.get("sent", 0) == 0 for report in seen)  # default's send never shows
        assert seen[-1].totals == {"opened": 1, "unique_opened": 1}
        assert (await root.call(api.GetReport(message="cart"))).totals == {"targeted": 1, "sent": 1, "delivered": 1}
        live = await dev.call(api.GetReport(message="cart", window="live"))
        assert live.totals == {"opened": 1, "unique_opened": 1}


# ---------------------------------------------------------------------------------------------
# restarts, storage, no keys


async def test_sandboxes_survive_a_restart_and_sealed_credentials_do_not_open_in_another(tmp_path: Path, fcm: Any) -> None:
    for project, account in (("acme-push", ACCOUNTS["default"]), ("acme-dev", ACCOUNTS["dev"])):
        await admin(fcm, "set_project", project, [account.spec()])
    for _ in range(2):
        server = Server(config(tmp_path, fcm))  # no keys: the hello chooses the sandbox
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as root:
                if [s.name for s in (await root.call(api.ListSandboxes())).sandboxes] == ["default"]:
                    await root.call(api.CreateSandbox(name="dev"))
                    await world(root, "default", "tok-default", "prod")
                    async with open_client(server.addresses[0], sandbox="dev") as dev:
                        await world(dev, "dev", "tok-dev", "dev")
            async with open_client(server.addresses[0], sandbox="dev") as dev:
                assert (await dev.call(api.GetProfile(identity="crm:1"))).attributes == {"sandbox": "dev"}
                assert [a.android.project_id for a in (await dev.call(api.ListApps())).apps] == ["acme-dev"]
            with pytest.raises(ConnectionClosed) as unknown:
                async with open_client(server.addresses[0], sandbox="nope"):
                    pass
            assert unknown.value.status is Status.NOT_FOUND and "no sandbox is named 'nope'" in str(unknown.value)
            server.request_stop()

    # dev's sealed app record, moved into default's database, does not open there
    folder = tmp_path / "data"
    env = lmdb.open(str(folder), max_dbs=400)
    with env.begin(write=True) as txn:
        moved = txn.get(APP.encode(), db=env.open_db(b"1.apps", txn=txn))
        txn.put(APP.encode(), moved, db=env.open_db(b"apps", txn=txn))
    env.close()
    store = ProfileStore(folder, clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with pytest.raises(StorageError, match="moved to another record"):
            apps.get_app(store.default, APP)
        assert apps.get_app(store.space("dev"), APP).android.project_id == "acme-dev"  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


def test_a_sandbox_name_is_checked() -> None:
    for bad in ("Dev", "1dev", "dev/x", "", "a" * 33, "dév"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"name": bad}, api.CreateSandbox)
