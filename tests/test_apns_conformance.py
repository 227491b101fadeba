"""Conformance: third-party APNs clients against the mock APNs server.

aioapns (Python, h2 with prior knowledge: it sets no ALPN) and @parse/node-apn (Node's http2,
ALPN h2) each send through the mock with token auth (a generated P-256 key registered in the
mock) and must see a success, 410 Unregistered with its timestamp, 400 BadDeviceToken for an
unknown token and 413 PayloadTooLarge for an oversize payload. Neither library checks the
payload size itself, so the 413 comes from the mock. aioapns also runs once with a client
certificate issued by the mock's CA.

The Node side is ``tests/node/send_node_apn.js``; its dependencies are installed with
``npm ci --prefix tests/node`` when ``tests/node/node_modules`` is missing. The Node test is
skipped only when ``node`` or ``npm`` is not installed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins.apns.mock import MockApnsProcess, SigningKey, issue_client_certificate

TOPIC = "com.example.conformance"
GOOD = "a1" * 32
GONE = "b2" * 32
UNKNOWN = "c3" * 32
GONE_AT_MS = 1_700_000_123_456
BIG_ALERT = "x" * 5000  # the compiled payload is over 4096 bytes
NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("CONFKEY001", "CONFTEAM01")


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[MockApnsProcess]:
    config = {
        "keys": [key.spec(topics=[TOPIC])],
        "tokens": {GOOD: [TOPIC], GONE: {"topics": [TOPIC], "unregistered_at_ms": GONE_AT_MS}},
    }
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), config=config, client_certs="optional") as m:
        yield m


@pytest.fixture(autouse=True)
def fresh(mock: MockApnsProcess) -> None:
    mock.admin.clear_accepted()
    mock.admin.clear_stats()


def _check_outcomes(mock: MockApnsProcess, ok_id: str, *, auth: str) -> None:
    [item] = mock.admin.accepted()
    assert item["token"] == GOOD and item["topic"] == TOPIC and item["apns_id"] == ok_id
    assert item["payload"]["aps"]["alert"] == "hello"
    assert item["auth"] == auth
    stats = mock.admin.stats()
    assert stats["rejected"] == {"Unregistered": 1, "BadDeviceToken": 1, "PayloadTooLarge": 1}


# --------------------------------------------------------------------------------------------
# aioapns


def _aioapns_send(mock: MockApnsProcess, **client_options: Any) -> tuple[str, list[Any]]:
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsDevelopmentClientProtocol

    class ToMock(APNsDevelopmentClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = mock.port

    ok_id = str(uuid.uuid4())

    async def run() -> list[Any]:
        # aioapns offers no ALPN: this also covers HTTP/2 with prior knowledge.
        client = APNs(topic=TOPIC, use_sandbox=True, ssl_context=mock.ssl_context(alpn=False), **client_options)
        client.pool.protocol_class = ToMock
        try:
            results = []
            for token, message, notification_id in [
                (GOOD, {"aps": {"alert": "hello"}}, ok_id),
                (GONE, {"aps": {"alert": "hello"}}, None),
                (UNKNOWN, {"aps": {"alert": "hello"}}, None),
                (GOOD, {"aps": {"alert": BIG_ALERT}}, None),
            ]:
                request = NotificationRequest(
                    device_token=token, message=message, notification_id=notification_id, push_type=PushType.ALERT
                )
                results.append(await asyncio.wait_for(client.send_notification(request), 20))
            return results
        finally:
            client.pool.close()
            await asyncio.sleep(0.1)  # let the transports finish closing

    return ok_id, asyncio.run(asyncio.wait_for(run(), 60))


def _check_aioapns(results: list[Any], ok_id: str) -> None:
    ok, gone, unknown, big = results
    assert ok.is_successful and ok.status == "200" and ok.notification_id == ok_id
    assert (gone.status, gone.description, gone.timestamp) == ("410", "Unregistered", GONE_AT_MS)
    assert (unknown.status, unknown.description) == ("400", "BadDeviceToken")
    assert (big.status, big.description) == ("413", "PayloadTooLarge")


def test_aioapns_token_auth(mock: MockApnsProcess, key: SigningKey) -> None:
    ok_id, results = _aioapns_send(mock, key=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)
    _check_aioapns(results, ok_id)
    _check_outcomes(mock, ok_id, auth=f"token:{key.key_id}")


def test_aioapns_certificate_auth(mock: MockApnsProcess, tmp_path: Path) -> None:
    cert, private_key = issue_client_certificate(mock.dir, TOPIC, environment="sandbox")
    pem = tmp_path / "client.pem"
    pem.write_bytes(cert + private_key)
    ok_id, results = _aioapns_send(mock, client_cert=str(pem))
    _check_aioapns(results, ok_id)
    _check_outcomes(mock, ok_id, auth="certificate")


# --------------------------------------------------------------------------------------------
# @parse/node-apn


@pytest.fixture(scope="module")
def node_apn() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the @parse/node-apn conformance test (not installed)")
    if not (NODE_DIR / "node_modules" / "@parse" / "node-apn").is_dir():
        done = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return Path(node)


def test_node_apn_token_auth(mock: MockApnsProcess, key: SigningKey, node_apn: Path) -> None:
    ok_id = str(uuid.uuid4())
    job = {
        "host": mock.host,
        "port": mock.port,
        "ca_file": str(mock.ca_file),
        "key_pem": key.private_key_pem,
        "key_id": key.key_id,
        "team_id": key.team_id,
        "topic": TOPIC,
        "notifications": [
            {"token": GOOD, "alert": "hello", "id": ok_id},
            {"token": GONE, "alert": "hello"},
            {"token": UNKNOWN, "alert": "hello"},
            {"token": GOOD, "alert": BIG_ALERT},
        ],
    }
    done = subprocess.run(
        [str(node_apn), str(NODE_DIR / "send_node_apn.js")],
        input=json.dumps(job),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ok, gone, unknown, big = json.loads(done.stdout)
    assert ok["sent"] is True and ok["apns_id"] == ok_id
    assert uuid.UUID(ok["unique_id"])  # sandbox: apns-unique-id reaches the library
    assert (gone["status"], gone["reason"], gone["timestamp"]) == (410, "Unregistered", GONE_AT_MS)
    assert (unknown["status"], unknown["reason"]) == (400, "BadDeviceToken")
    assert big["length"] > 4096  # node-apn does not check the size itself: the mock answers
    assert (big["status"], big["reason"]) == (413, "PayloadTooLarge")
    _check_outcomes(mock, ok_id, auth=f"token:{key.key_id}")
