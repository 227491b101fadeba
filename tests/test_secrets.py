"""Secrets at rest, end to end: a real ``pigeon serve`` process (debug log) with the mock APNs
and the mock FCM over TLS. Credentials are registered (an APNs .p8, an APNs certificate from a
.p12 with a password, a Firebase service account, and credentials that are refused), then
sends, previews, stats, reports and a kill -9 in the middle of a send (the outbox full); then
everything the server wrote (the data folder's files, at the crash and at the end, its log,
every reply and error) is searched for the key material in PEM, DER and base64 forms
(`tests.test_sealing.key_forms`), and none is found. And a data folder of schema version 1,
credentials in plain text, is migrated when the server starts: the credentials still send,
and the file holds no plain text any more."""

from __future__ import annotations

import base64
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from plugins.apns.mock import MockApnsProcess, SigningKey, issue_client_certificate
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import CallError, PigeonProtocolError, Status
from protocols.frames import Error, Reply
from protocols.trio_client import open_client
from server.channels import AndroidRecord, AppRecord, IosRecord
from server.testing import ServerProcess

from .test_sealing import NOW, key_forms, leaks, write_version_1_folder

APP = "com.acme.shop"  # iOS token auth and Android
CERT_APP = "com.acme.cert"  # iOS certificate auth, from a .p12 with a password
BAD_APP = "com.acme.bad"  # a service account FCM refuses
KEY = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
ACCOUNT = ServiceAccount.generate("acme-push")
STRANGER = ServiceAccount.generate("acme-push")  # unknown to the mock FCM
PASSWORD = "p12-" + secrets.token_hex(12)
PROFILES = 400
APNS_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def mocks(tmp_path_factory: pytest.TempPathFactory):
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), environment="sandbox", client_certs="optional",
                         config={"keys": [KEY.spec()], "accept_any_token": True}) as apns, \
            MockFcmProcess(tmp_path_factory.mktemp("fcm"),
                           config={"projects": {"acme-push": {"service_accounts": [ACCOUNT.spec()]}}}) as fcm:
        yield apns, fcm


def server_env(apns: MockApnsProcess, fcm: MockFcmProcess) -> dict[str, str]:
    return {
        "PIGEON_APNS__SANDBOX__ADDRESS": apns.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(apns.ca_file),
        "PIGEON_FCM__URL": fcm.url, "PIGEON_FCM__TOKEN_URI": fcm.token_uri, "PIGEON_FCM__CA_FILE": str(fcm.ca_file),
        "PIGEON_FCM__RETRY_MIN_S": "0.05",
    }


class Recorder:
    """A client whose every reply and error is kept, as MessagePack and as JSON."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: list[bytes] = []

    async def call(self, request: Any) -> Any:
        try:
            reply = await self.client.call(request)
        except CallError as exc:
            self.seen.append(f"{exc} {exc.field}".encode())
            raise
        self.seen += [msgspec.msgpack.encode(reply), msgspec.json.encode(reply)]
        return reply


def certificate(apns: MockApnsProcess) -> tuple[bytes, bytes, bytes]:
    """A client certificate for CERT_APP: its PEM, its key's PEM, and both in a .p12 sealed
    with PASSWORD."""
    cert_pem, key_pem = issue_client_certificate(apns.dir, CERT_APP, environment="sandbox")
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    p12 = pkcs12.serialize_key_and_certificates(
        b"acme", key, cert, None, serialization.BestAvailableEncryption(PASSWORD.encode()))  # type: ignore[arg-type]
    return cert_pem, key_pem, p12


def every_form(cert_pem: bytes, cert_key_pem: bytes, p12: bytes) -> dict[str, bytes]:
    forms: dict[str, bytes] = {}
    for name, pem in (("p8", KEY.private_key_pem), ("service account", ACCOUNT.private_key_pem),
                      ("refused service account", STRANGER.private_key_pem), ("certificate key", cert_key_pem)):
        forms.update({f"{name}: {form}": value for form, value in key_forms(pem).items()})
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    forms.update({"certificate der": der, "certificate base64": base64.b64encode(der)[:200],
                  "p12": p12, "p12 base64": base64.b64encode(p12)[:200], "password": PASSWORD.encode()})
    return forms


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def outbox_entries(folder: Path) -> int:
    env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=30)
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(b"outbox", txn=txn, create=False))["entries"]
    finally:
        env.close()


async def register(rec: Recorder, fcm: MockFcmProcess, p12: bytes) -> None:
    """The three apps, and credentials the server refuses."""
    await rec.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
        key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
    await rec.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(fcm.token_uri)))
    with pytest.raises(CallError, match="password is wrong"):
        await rec.call(api.RegisterIosApp(app=CERT_APP, environment="sandbox",
                                          auth=api.ApnsCertificateAuth(pkcs12=p12, password="not-" + PASSWORD)))
    await rec.call(api.RegisterIosApp(app=CERT_APP, environment="sandbox",
                                      auth=api.ApnsCertificateAuth(pkcs12=p12, password=PASSWORD)))
    with pytest.raises(CallError, match="P-256"):  # an RSA key where a .p8 goes
        await rec.call(api.RegisterIosApp(app=BAD_APP, environment="sandbox", auth=api.ApnsTokenAuth(
            key_pem=STRANGER.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
    await rec.call(api.RegisterAndroidApp(app=BAD_APP, service_account=STRANGER.info(fcm.token_uri)))


async def sends_previews_and_errors(rec: Recorder) -> None:
    for i in range(PROFILES):
        await rec.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform="fcm", token=f"tok-{i}"))
    await rec.call(api.RegisterToken(identity="crm:0", app=APP, platform="apns-sandbox", token=APNS_TOKEN))
    await rec.call(api.PublishConfig(config=api.ChannelConfig(name="all", apps=[APP])))
    await rec.call(api.PublishMessage(message=api.MessageSpec(
        id="sale", channel="all", content=api.MessageContent(title="Hi", body="A sale"))))
    await rec.call(api.PreviewMessage(id="sale", identity="crm:0"))
    sent = await rec.call(api.SendPush(app=APP, identity="crm:0", content=api.PushContent(title="Hi")))
    assert sorted(o.status for o in sent.outcomes) == ["sent", "sent"], sent
    sent = await rec.call(api.SendPush(app=CERT_APP, token=APNS_TOKEN, platform="apns-sandbox",
                                       content=api.PushContent(title="Hi")))
    assert [o.status for o in sent.outcomes] == ["sent"], sent
    refused = await rec.call(api.SendPush(app=BAD_APP, token="tok-1", platform="fcm", content=api.PushContent(title="Hi")))
    assert [o.reason for o in refused.outcomes] == ["InvalidCredentials"], refused
    for request in (api.GetApp(app=APP), api.GetApp(app=CERT_APP), api.ListApps(), api.GetStats(),
                    api.GetReport(message="sale")):
        await rec.call(request)


async def send_and_kill(server: ServerProcess, fcm: MockFcmProcess) -> None:
    """``messages.send`` to every profile, killed (SIGKILL) once FCM has taken some."""
    fcm.admin.set_faults(accept_any_token=True, latency_ms=200)
    start = fcm.admin.stats()["successes"]

    async def send() -> None:
        try:
            async with open_client(server.address) as client:
                await client.call(api.SendMessage(id="sale", identities=[f"crm:{i}" for i in range(PROFILES)]))
        except (PigeonProtocolError, OSError):
            pass  # killed under it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        with trio.fail_after(30):
            while await trio.to_thread.run_sync(lambda: fcm.admin.stats()["successes"]) < start + 20:
                await trio.sleep(0.02)
        server.signal(signal.SIGKILL)
        server.wait()


async def test_no_key_material_in_anything_the_server_wrote(tmp_path, mocks):
    apns, fcm = mocks
    fcm.admin.set_faults(accept_any_token=True)
    cert_pem, cert_key_pem, p12 = certificate(apns)
    forms = every_form(cert_pem, cert_key_pem, p12)
    assert "p8: pem" in leaks(KEY.private_key_pem.encode(), forms)  # the search finds what it looks for
    assert "certificate key: pem" in leaks(cert_key_pem, forms)
    written: dict[str, bytes] = {}
    server = ServerProcess(tmp_path / "data", "--log-level", "debug", env=server_env(apns, fcm))
    server.start()
    try:
        async with open_client(server.address) as client:
            rec = Recorder(client)
            await register(rec, fcm, p12)
            await sends_previews_and_errors(rec)
        await send_and_kill(server, fcm)
        staged = outbox_entries(tmp_path / "data")
        assert staged > 0, "the kill left nothing in the outbox: nothing tested there"
        written.update({f"at the crash: {name}": data for name, data in folder_files(tmp_path / "data").items()})
        written["log before the crash"] = "".join(server.log).encode()
        fcm.admin.set_faults(accept_any_token=True, latency_ms=0)
        server.start()  # delivers the outbox again, resumes the send
        async with open_client(server.address) as client:
            rec2 = Recorder(client)
            with trio.fail_after(60):
                while (await rec2.call(api.GetReport(message="sale"))).totals.get("sent", 0) < PROFILES:
                    await trio.sleep(0.2)
            await rec2.call(api.GetStats())
            await rec2.call(api.DeleteApp(app=BAD_APP))
        assert server.stop() == 0
    finally:
        server.kill()
    assert any("delivering" in line and "again" in line for line in server.log)
    written.update({f"at the end: {name}": data for name, data in folder_files(tmp_path / "data").items()})
    written["log after the crash"] = "".join(server.log).encode()
    written["replies"] = b"\n".join(rec.seen + rec2.seen)
    assert len(written) > 6 and written["log before the crash"]
    found = {name: leaks(data, forms) for name, data in written.items()}
    assert {name: forms for name, forms in found.items() if forms} == {}


async def test_a_version_1_folder_is_migrated_when_the_server_starts_and_its_credentials_still_send(tmp_path, mocks):
    apns, fcm = mocks
    fcm.admin.set_faults(accept_any_token=True)
    record = AppRecord(app=APP, version=2, ios=IosRecord(
        bundle_id=APP, environment="sandbox", auth="token", key_pem=KEY.private_key_pem, key_id=KEY.key_id,
        team_id=KEY.team_id, updated=NOW,
    ), android=AndroidRecord(
        package_name=APP, project_id="acme-push", client_email=ACCOUNT.client_email,
        private_key_id=ACCOUNT.private_key_id, private_key_pem=ACCOUNT.private_key_pem, token_uri=fcm.token_uri,
        updated=NOW,
    ))
    write_version_1_folder(tmp_path / "data", [record])
    forms = {**key_forms(KEY.private_key_pem), **{f"rsa {k}": v for k, v in key_forms(ACCOUNT.private_key_pem).items()}}
    assert leaks((tmp_path / "data" / "data.mdb").read_bytes(), forms)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # what the old version left
    with ServerProcess(tmp_path / "data", env=server_env(apns, fcm)) as server:
        async with open_client(server.address) as client:
            for platform, token in (("apns-sandbox", APNS_TOKEN), ("fcm", "tok-1")):
                sent = await client.call(api.SendPush(app=APP, token=token, platform=platform,
                                                      content=api.PushContent(title="Hi")))
                assert [o.status for o in sent.outcomes] == ["sent"], sent
            stats = await client.call(api.GetStats())
            assert stats.store is not None and stats.store.schema_version == 2
            info = await client.call(api.GetApp(app=APP))
            assert info.ios is not None and info.ios.key_id == KEY.key_id and info.android is not None
        assert server.stop() == 0
    log = "".join(server.log)
    assert "schema version 1 migrated to 2" in log and "compacted" in log
    assert leaks((tmp_path / "data" / "data.mdb").read_bytes(), forms) == []
    assert {name: leaks(data, forms) for name, data in folder_files(tmp_path / "data").items()} == {
        name: [] for name in folder_files(tmp_path / "data")}


# -- pigeon secrets rotate --------------------------------------------------------------------


def pigeon(address: str, *args: str, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", address, "--api-key", key],
                          capture_output=True, text=True, timeout=60)


async def test_secrets_rotate_reencrypts_under_a_new_key_while_sends_go_on(tmp_path, mocks):
    """With API keys on (their pepper is sealed too): sends through APNs and FCM before, during
    and after two rotations (the protocol method, then the CLI) all succeed; the key file ends
    with a new key alone; a restart on it opens the credentials and the admin key still works."""
    apns, fcm = mocks
    fcm.admin.set_faults(accept_any_token=True)
    key_file = tmp_path / "data.master-key"
    outcomes: list[str] = []
    with ServerProcess(tmp_path / "data", env=server_env(apns, fcm), auth="keys") as server:
        admin = server.admin_key
        first = key_file.read_text()
        async with open_client(server.address, api_key=admin) as client:
            await client.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
                key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
            await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(fcm.token_uri)))

            async def keep_sending() -> None:
                async with open_client(server.address, api_key=admin) as sender:
                    while True:
                        for platform, token in (("apns-sandbox", APNS_TOKEN), ("fcm", "tok-1")):
                            sent = await sender.call(api.SendPush(app=APP, token=token, platform=platform,
                                                                  content=api.PushContent(title="Hi")))
                            outcomes.extend(o.status for o in sent.outcomes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                while len(outcomes) < 10:
                    await trio.sleep(0.01)
                rotated = await client.call(api.RotateSecrets())
                during = len(outcomes)
                cli = await trio.to_thread.run_sync(lambda: pigeon(server.address, "secrets", "rotate", key=admin))
                while len(outcomes) < during + 10:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert server.stop() == 0
    assert rotated.resealed == 2 and rotated.key_file == str(key_file.resolve())  # the app, the pepper
    assert cli.returncode == 0 and "master key rotated: 2 sealed values" in cli.stdout, cli
    assert set(outcomes) == {"sent"}, outcomes
    last = key_file.read_text()
    assert len(last.split()) == 1 and last not in (first, "") and rotated.fingerprint not in cli.stdout
    assert "master key rotation done" in "".join(server.log)
    with ServerProcess(tmp_path / "data", env=server_env(apns, fcm), auth="keys") as server:
        async with open_client(server.address, api_key=admin) as client:
            sent = await client.call(api.SendPush(app=APP, token="tok-1", platform="fcm",
                                                  content=api.PushContent(title="Hi")))
            assert [o.status for o in sent.outcomes] == ["sent"]
    assert key_file.read_text() == last


async def test_secrets_rotate_with_the_key_in_the_environment_says_how_to_rotate_it(tmp_path):
    env = {"PIGEON_MASTER_KEY": secrets.token_hex(32)}
    with ServerProcess(tmp_path / "data", env=env) as server:
        async with open_client(server.address) as client:
            with pytest.raises(CallError) as refused:
                await client.call(api.RotateSecrets())
    assert refused.value.status == Status.FAILED_PRECONDITION
    assert "PIGEON_MASTER_KEY" in refused.value.message and "new,old" in refused.value.message
    assert not (tmp_path / "data.master-key").exists()


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory, mocks):
    """A server with an app, for fuzzing secrets.rotate, and a raw connection to it."""
    from .test_rpc_fuzz import _Connection

    apns, fcm = mocks
    folder = tmp_path_factory.mktemp("rotate")
    with ServerProcess(folder / "data", env=server_env(apns, fcm)) as server:
        connection = _Connection(server.address)
        register = api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
            key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id))
        assert isinstance(connection.call(register.method, msgspec.msgpack.encode(register)), Reply)
        try:
            yield server, connection, folder / "data.master-key"
        finally:
            connection.sock.close()


@settings(max_examples=30, deadline=None)
@given(body=st.one_of(st.binary(max_size=40), _values.map(msgspec.msgpack.encode),
                      st.dictionaries(st.text(max_size=8), _values, max_size=3).map(msgspec.msgpack.encode)))
def test_any_rotate_request_rotates_or_is_refused_clearly_and_the_credentials_stay_readable(rotating, body):
    server, connection, key_file = rotating
    before = key_file.read_text()
    answer = connection.call("secrets.rotate", body)
    if isinstance(answer, Reply):
        done = msgspec.msgpack.decode(answer.body, type=api.SecretsRotated)
        assert done.resealed == 2 and key_file.read_text() != before  # the app, the API keys' pepper
    else:
        assert isinstance(answer, Error) and answer.code == Status.INVALID_ARGUMENT, answer
        assert key_file.read_text() == before
    assert len(key_file.read_text().split()) == 1
    get = api.GetApp(app=APP)
    info = connection.call(get.method, msgspec.msgpack.encode(get))
    assert isinstance(info, Reply), info
    assert msgspec.msgpack.decode(info.body, type=api.AppInfo).ios is not None
