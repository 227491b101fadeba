"""Channel configurations, messages and previews through the socket protocol (a real server,
real LMDB); previews build the exact APNs and FCM payloads without sending anything."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest
import trio

from plugins.apns.mock import SigningKey
from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import open_client
from server.messages.content import MAX_TEMPLATES

KEY = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
ACCOUNT = ServiceAccount.generate("acme-push")
APP = "com.acme.shop"


async def setup_app(client) -> None:
    await client.call(api.RegisterIosApp(app=APP, environment="both", auth=api.ApnsTokenAuth(
        key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
    await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info()))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="shop-push", apps=[APP])))


def message(**content: Any) -> api.MessageSpec:
    fields = {"title": "Hi {{ profile.person.firstName | default('there') }}",
              "body": "Your {{ event.product }} is waiting", **content}
    return api.MessageSpec(id="cart", channel="shop-push", content=api.MessageContent(**fields))


async def test_configurations_and_messages_are_versioned(client):
    with pytest.raises(CallError) as caught:
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="shop-push", apps=[APP])))
    assert caught.value.status == Status.NOT_FOUND and caught.value.field == "$.config.apps[0]"
    await setup_app(client)
    again = await client.call(api.PublishConfig(config=api.ChannelConfig(name="shop-push", apps=[APP], consent="opt_in")))
    assert again.version == 2
    assert (await client.call(api.GetConfig(name="shop-push", version=1))).config.consent == "not_opted_out"
    assert (await client.call(api.GetConfig(name="shop-push"))).config.consent == "opt_in"

    first = await client.call(api.PublishMessage(message=message()))
    assert first.version == 1 and first.templates == ["$.content.title", "$.content.body"]
    second = await client.call(api.PublishMessage(message=message(body="Plain body")))
    assert second.version == 2 and second.templates == ["$.content.title"]
    # Versions are never edited: the first is still there as it was.
    assert (await client.call(api.GetMessage(id="cart", version=1))).message.content.body == "Your {{ event.product }} is waiting"
    assert [m.version for m in (await client.call(api.ListMessages())).messages] == [2]
    assert [c.version for c in (await client.call(api.ListConfigs())).configs] == [2]


@pytest.mark.parametrize(
    ("spec", "status", "field", "text"),
    [
        (api.MessageSpec(id="m", channel="nope", content=api.MessageContent(title="x")), Status.NOT_FOUND,
         "$.message.channel", "no channel configuration 'nope'"),
        (api.MessageSpec(id="m", channel="shop-push", content=api.MessageContent(title="Hi {{ profile. }}")),
         Status.INVALID_ARGUMENT, "$.content.title", "line 1, column 4"),
        (api.MessageSpec(id="m", channel="shop-push", content=api.MessageContent(
            title="x", data={"k": "{% for x in y %}"})), Status.INVALID_ARGUMENT, "$.content.data.k", "line 1"),
    ],
)
async def test_bad_messages_are_refused_with_the_field(client, spec, status, field, text):
    await setup_app(client)
    with pytest.raises(CallError) as caught:
        await client.call(api.PublishMessage(message=spec))
    assert (caught.value.status, caught.value.field) == (status, field)
    assert text in caught.value.message
    with pytest.raises(CallError) as missing:
        await client.call(api.GetMessage(id="m"))
    assert missing.value.status == Status.NOT_FOUND  # nothing half-published


async def test_preview_builds_the_exact_payloads_for_a_stored_profile(client):
    await setup_app(client)
    await client.call(api.UpsertProfile(identity="crm:42", attributes={"person": {"firstName": "Ana"}}))
    spec = message(
        media_url="https://cdn.example.com/{{ event.sku }}.jpg",
        on_click=api.OnClick(action="deeplink", url="shop://cart?sku={{ event.sku }}"),
        buttons=[api.Button(id="buy", label="Buy {{ event.product }}", action="deeplink", url="shop://buy")],
        badge=1, sound="default", data={"sku": "{{ event.sku }}"},
        ios=api.IosFields(category="CART", thread_id="cart", collapse_id="cart-{{ event.sku }}"),
        android=api.AndroidFields(channel_id="offers", notification_priority="high"),
    )
    await client.call(api.PublishMessage(message=spec))
    result = await client.call(api.PreviewMessage(id="cart", identity="crm:42", event={"product": "red shoes", "sku": "S1"}))
    assert result.excluded is None
    ios, android = result.previews
    assert (ios.platform, ios.app, ios.error) == ("ios", APP, None)
    act = '[{"aid":"buy","label":"Buy red shoes","uri":"shop://buy","type":"DEEPLINK"}]'
    assert ios.payload == {
        "aps": {"alert": {"title": "Hi Ana", "body": "Your red shoes is waiting"}, "badge": 1, "sound": "default",
                "thread-id": "cart", "category": "CART", "mutable-content": 1},
        "sku": "S1", "adb_act": act, "adb_media": "https://cdn.example.com/S1.jpg",
        "adb_uri": "shop://cart?sku=S1", "adb_a_type": "DEEPLINK", "_p": {"m": "cart", "v": 1, "x": "preview"},
    }
    assert ios.headers["apns-topic"] == APP and ios.headers["apns-collapse-id"] == "cart-S1"
    assert ios.size == len(json.dumps(ios.payload, separators=(",", ":"), ensure_ascii=False).encode())
    assert android.error is None
    assert android.payload["notification"] == {"title": "Hi Ana", "body": "Your red shoes is waiting",
                                                "image": "https://cdn.example.com/S1.jpg"}
    assert android.payload["android"]["notification"]["channel_id"] == "offers"
    assert android.payload["data"]["adb_act"] == act and android.payload["data"]["sku"] == "S1"
    assert json.loads(android.payload["data"]["_p"]) == {"m": "cart", "v": 1, "x": "preview"}


async def test_preview_with_a_sample_profile_and_the_exclusions(client):
    await setup_app(client)
    await client.call(api.PublishMessage(message=message()))
    sample = await client.call(api.PreviewMessage(id="cart", profile={"person": {"firstName": "Bo"}}, event={"product": "hat"}))
    assert sample.previews[0].payload["aps"]["alert"] == {"title": "Hi Bo", "body": "Your hat is waiting"}
    defaulted = await client.call(api.PreviewMessage(id="cart", profile={}))
    assert defaulted.previews[0].payload["aps"]["alert"]["title"] == "Hi there"

    strict = api.MessageSpec(id="strict", channel="shop-push", on_missing="exclude",
                             content=api.MessageContent(title="Hi {{ profile.person.firstName }}"))
    await client.call(api.PublishMessage(message=strict))
    excluded = await client.call(api.PreviewMessage(id="strict", profile={}))
    assert excluded.excluded == "MissingValue" and "$.content.title" in excluded.detail and excluded.previews == []

    runaway = api.MessageSpec(id="runaway", channel="shop-push", content=api.MessageContent(
        title="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"))
    await client.call(api.PublishMessage(message=runaway))
    stopped = await client.call(api.PreviewMessage(id="runaway", profile={}))
    assert stopped.excluded == "TemplateLimit"

    big = api.MessageSpec(id="big", channel="shop-push", content=api.MessageContent(
        title="{{ 'x' * 3000 }}", body="{{ 'y' * 2000 }}"))
    await client.call(api.PublishMessage(message=big))
    oversize = await client.call(api.PreviewMessage(id="big", profile={}))
    ios, android = oversize.previews
    assert ios.error == "PayloadTooLarge" and android.error == "INVALID_ARGUMENT"
    # One text longer than any payload (api.MAX_TEXT) excludes the profile, naming the field.
    longer = api.MessageSpec(id="longer", channel="shop-push", content=api.MessageContent(title="{{ 'x' * 5000 }}"))
    await client.call(api.PublishMessage(message=longer))
    too_long = await client.call(api.PreviewMessage(id="longer", profile={}))
    assert too_long.excluded == "TemplateError" and "$.title" in too_long.detail and too_long.previews == []

    with pytest.raises(CallError) as caught:
        await client.call(api.PreviewMessage(id="nope", profile={}))
    assert caught.value.status == Status.NOT_FOUND


def test_messages_are_authored_as_yaml_files_from_the_cli(server_process, tmp_path):
    def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", server_process.address],
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "key.p8").write_text(KEY.private_key_pem)
    assert pigeon("apps", "register-ios", APP, "--p8", str(tmp_path / "key.p8"), "--key-id", KEY.key_id,
                  "--team-id", KEY.team_id).returncode == 0
    (tmp_path / "config.yaml").write_text(f"name: shop-push\napps: [{APP}]\nplatforms: [ios]\n")
    r = pigeon("configs", "publish", str(tmp_path / "config.yaml"))
    assert r.returncode == 0, r.stderr
    assert "channel configuration shop-push v1" in r.stdout
    (tmp_path / "cart.yaml").write_text(
        "id: cart\nchannel: shop-push\ncontent:\n  title: 'Hi {{ profile.person.firstName }}'\n  body: Come back\n"
    )
    r = pigeon("messages", "publish", str(tmp_path / "cart.yaml"))
    assert r.returncode == 0 and "message cart v1" in r.stdout and "templates in title" in r.stdout
    (tmp_path / "bad.yaml").write_text("id: bad\nchannel: shop-push\ncontent:\n  title: 'Hi {{ profile. }}'\n")
    r = pigeon("messages", "publish", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and f"{tmp_path / 'bad.yaml'}: $.content.title: line 1, column 4" in r.stderr
    (tmp_path / "typo.yaml").write_text("id: typo\nchannel: shop-push\ncontent:\n  titel: x\n")
    r = pigeon("messages", "publish", str(tmp_path / "typo.yaml"))
    assert r.returncode == 2 and "typo.yaml: $.content.titel" in r.stderr
    r = pigeon("messages", "preview", "cart", "--profile", '{"person": {"firstName": "Ana"}}')
    assert r.returncode == 0, r.stderr
    assert "ios (com.acme.shop)" in r.stdout and '"title": "Hi Ana"' in r.stdout


def readline(stream: Any, timeout: float = 30) -> str:
    """A line from a child's output, or a failure after ``timeout`` seconds (not a hang)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, f"no line within {timeout} s"
    return lines[0]


def test_reports_from_the_cli_as_a_table_as_json_and_watched(server_process, tmp_path):
    def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", server_process.address],
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "key.p8").write_text(KEY.private_key_pem)
    assert pigeon("apps", "register-ios", APP, "--p8", str(tmp_path / "key.p8"), "--key-id", KEY.key_id,
                  "--team-id", KEY.team_id).returncode == 0
    (tmp_path / "config.yaml").write_text(f"name: shop-push\napps: [{APP}]\nplatforms: [ios]\n")
    (tmp_path / "cart.yaml").write_text("id: cart\nchannel: shop-push\ncontent:\n  title: Hi\n")
    assert pigeon("configs", "publish", str(tmp_path / "config.yaml")).returncode == 0
    assert pigeon("messages", "publish", str(tmp_path / "cart.yaml")).returncode == 0
    assert pigeon("profiles", "upsert", "crm:1").returncode == 0  # no device

    with subprocess.Popen([sys.executable, "-m", "server.cli", "reports", "--message", "cart", "--watch", "0.1", "--json",
                           "--server", server_process.address], stdout=subprocess.PIPE, text=True) as watch:
        try:
            first = json.loads(readline(watch.stdout))  # at once: nothing yet (every field shown, defaults included)
            assert first["window"] == "all_time" and first["totals"] == {} and first["by_platform"] == {}
            r = pigeon("messages", "send", "cart", "--identity", "crm:1")
            assert r.returncode == 0 and "1 targeted, 1 excluded (NoTokenForApp 1)" in r.stdout, r.stdout + r.stderr
            pushed = json.loads(readline(watch.stdout))  # the server sends it as the counts change
            assert pushed["totals"] == {"targeted": 1, "excluded": 1} and pushed["reasons"] == {"excluded": {"NoTokenForApp": 1}}
        finally:
            watch.terminate()  # it runs until interrupted

    r = pigeon("reports", "--message", "cart")
    assert r.returncode == 0, r.stderr
    [header, totals] = r.stdout.splitlines()[:2]
    assert header.split()[:3] == ["TARGETED", "EXCLUDED", "SENT"] and totals.split()[:4] == ["all", "1", "1", "0"]
    assert "excluded: NoTokenForApp 1" in r.stdout
    assert json.loads(pigeon("reports", "--message", "cart", "--json").stdout)["totals"] == pushed["totals"]


# -- bounds (issue 11, item 2) --------------------------------------------------------------

#: Templates that held the server for 4 s to over 10 minutes, and took up to 3.8 GB.
HOSTILE = {
    "power": "{{ ((10**999)**999)**999 }}",
    "center": "{{ 'a' | center(1000000000) }}",
    "percent": "{{ '%0999999999d' % 1 }}",
    "precision": "{{ '%.999999999f' % 1.0 }}",
    "indent": "{{ 'a\nb' | indent(event.n) }}",
}


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


async def test_the_server_answers_others_while_hostile_templates_are_published_and_previewed(server_process):
    async with open_client(server_process.address) as attacker, open_client(server_process.address) as bystander:
        await setup_app(attacker)
        peak_before = peak_rss_mb(server_process.proc.pid)
        waits: list[float] = []
        done = trio.Event()

        async def watch() -> None:
            for i in range(2_000):
                if done.is_set() and i >= 5:
                    return
                started = trio.current_time()
                assert (await bystander.call(api.GetHealth())).status == "serving"
                waits.append(trio.current_time() - started)
                await trio.sleep(0.01)

        # Without the bounds, the first publish holds the server for 20 s, a preview for minutes.
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for name, source in HOSTILE.items():
                    spec = api.MessageSpec(id=name, channel="shop-push", content=api.MessageContent(title=source))
                    await attacker.call(api.PublishMessage(message=spec))  # compiling evaluates nothing
                    preview = await attacker.call(api.PreviewMessage(id=name, profile={}, event={"n": 10**9}))
                    assert preview.excluded == "TemplateLimit" and preview.detail.startswith("$.content.title: ")
                done.set()
        assert len(waits) >= 5 and max(waits) < 2.0  # measured: a few ms; the margin is for a busy machine
        assert peak_rss_mb(server_process.proc.pid) - peak_before < 50


@pytest.mark.parametrize(
    ("content", "field", "text"),
    [
        (api.MessageContent(title="x" * 3_000_000), "$.message.content.title", "length <= 4096"),
        (api.MessageContent(title="Hi", buttons=[api.Button(id="b", label="x" * 4097)]),
         "$.message.content.buttons[0].label", "length <= 4096"),
        (api.MessageContent(title="Hi", data={str(i): "v" for i in range(101)}), "$.message.content.data",
         "length <= 100"),
        (api.MessageContent(title="Hi", data={"k": "{{ x }}" * 600}), "$.message.content.data[...]", "length <= 4096"),
        (api.MessageContent(title="Hi", ios=api.IosFields(thread_id="t" * 4097)), "$.message.content.ios.thread_id",
         "length <= 4096"),
    ],
)
async def test_message_texts_are_bounded_by_what_a_payload_holds(client, content, field, text):
    # A 3 MB title was published (compiled and stored). (Constructors do not check; the server does.)
    await setup_app(client)
    with pytest.raises(CallError) as caught:
        await client.call(api.PublishMessage(message=api.MessageSpec(id="m", channel="shop-push", content=content)))
    assert (caught.value.status, caught.value.field) == (Status.INVALID_ARGUMENT, field)
    assert text in caught.value.message
    with pytest.raises(CallError) as missing:
        await client.call(api.GetMessage(id="m"))
    assert missing.value.status == Status.NOT_FOUND


async def test_a_messages_templates_are_bounded_together(client):
    await setup_app(client)
    template = "{{ profile.person.firstName | default('you') }} " * 80  # 3,920 characters
    spec = api.MessageSpec(id="long", channel="shop-push", content=api.MessageContent(
        title=template, subtitle=template, body=template))
    with pytest.raises(CallError) as caught:
        await client.call(api.PublishMessage(message=spec))
    assert (caught.value.status, caught.value.field) == (Status.INVALID_ARGUMENT, "$.content")
    assert f"more than {MAX_TEMPLATES} characters in all (at $.content.body)" in caught.value.message
    two = api.MessageSpec(id="long", channel="shop-push", content=api.MessageContent(title=template, body=template))
    assert (await client.call(api.PublishMessage(message=two))).templates == ["$.content.title", "$.content.body"]


async def test_an_audience_written_with_a_single_equals_says_how_to_compare(client):
    await setup_app(client)
    await client.call(api.PublishMessage(message=message()))
    with pytest.raises(CallError) as caught:
        await client.call(api.SendMessage(id="cart", audience="profile.city = 'Oslo'"))
    assert (caught.value.status, caught.value.field) == (Status.INVALID_ARGUMENT, "$.audience")
    assert caught.value.message == ("$.audience: unexpected '=' after the expression: to compare, write '==' "
                                    "(profile.city == 'Oslo')")
