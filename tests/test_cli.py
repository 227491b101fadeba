"""The ``pigeon`` command line against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from protocols import api
from server._cli import COMMANDS, _build_parser


def pigeon(address: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server._cli", *args, "--server", address],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def test_every_method_has_a_cli_command():
    assert set(COMMANDS) == set(api.METHODS)
    parser = _build_parser()
    for command in COMMANDS.values():
        for variant in command.split(" / "):
            args = variant.split()
            # parsing --help for the command proves it exists (exits 0)
            with pytest.raises(SystemExit) as info:
                parser.parse_args([*args, "--help"])
            assert info.value.code == 0


def test_profile_lifecycle_from_the_cli(server_process):
    addr = server_process.address
    r = pigeon(addr, "profiles", "upsert", "crm:42", '{"person": {"firstName": "Ana"}, "age": 31}')
    assert r.returncode == 0, r.stderr
    assert "person.firstName = \"Ana\"" in r.stdout and "age = 31" in r.stdout

    assert pigeon(addr, "profiles", "patch", "crm:42", '{"age": null, "city": "Porto"}').returncode == 0
    assert pigeon(addr, "profiles", "link", "crm:42", "email:ana@example.com").returncode == 0
    r = pigeon(addr, "tokens", "register", "email:ana@example.com", "--app", "com.acme.app", "--platform", "apns", "--token", "AB" * 32)
    assert r.returncode == 0 and "registered" in r.stdout
    assert pigeon(addr, "consent", "set", "crm:42", "--app", "com.acme.app", "--push", "in").returncode == 0

    r = pigeon(addr, "profiles", "get", "email:ana@example.com")
    assert r.returncode == 0
    assert "also known as: email:ana@example.com" in r.stdout
    assert 'city = "Porto"' in r.stdout and "age" not in r.stdout
    assert "com.acme.app  apns" in r.stdout and "active" in r.stdout
    assert "com.acme.app: push in" in r.stdout

    r = pigeon(addr, "profiles", "get", "crm:42", "--json")
    profile = json.loads(r.stdout)
    assert profile["identities"] == ["crm:42", "email:ana@example.com"]
    assert profile["registrations"][0]["token"] == "ab" * 32

    r = pigeon(addr, "tokens", "unregister", "--app", "com.acme.app", "--token", "ab" * 32)
    assert r.returncode == 0 and "crm:42" in r.stdout
    r = pigeon(addr, "profiles", "unlink", "email:ana@example.com")
    assert r.returncode == 0
    r = pigeon(addr, "profiles", "delete", "crm:42")
    assert r.returncode == 0 and "deleted profile crm:42" in r.stdout


def test_errors_are_readable_with_exit_status_1_or_2(server_process):
    addr = server_process.address
    r = pigeon(addr, "profiles", "get", "crm:404")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "crm:404" in r.stderr
    r = pigeon(addr, "profiles", "get", "nope")
    assert r.returncode == 1 and "$.identity" in r.stderr and "identity like crm:42" in r.stderr
    r = pigeon(addr, "profiles", "upsert", "crm:1", "[1, 2]")
    assert r.returncode == 2 and "must be a JSON object" in r.stderr
    r = pigeon(addr, "events", "send", "crm:1", "bad type!")
    assert r.returncode == 2 and "$.type" in r.stderr
    r = pigeon("127.0.0.1:1", "health")
    assert r.returncode == 1 and "cannot talk to the server" in r.stderr


def test_events_send_list_and_import(server_process, tmp_path):
    addr = server_process.address
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = pigeon(addr, "events", "send", "crm:1", "app.open", "--data", '{"screen": "home"}', "--ts", an_hour_ago)
    assert r.returncode == 0 and "accepted 1 event(s)" in r.stdout, r.stderr
    assert pigeon(addr, "events", "send", "crm:1", "app.close").returncode == 0

    lines = [json.dumps({"identity": f"crm:{i % 3}", "type": "page.view", "data": {"n": i}}) for i in range(1200)]
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"identity": "crm:1", "type": "page.view", "ts": "2001-01-01T00:00:00Z"}))
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = pigeon(addr, "events", "import", str(path), "--batch-size", "250")
    assert r.returncode == 1  # some lines were bad
    assert "1202 line(s): 1200 event(s) accepted, 1 invalid, 1 rejected" in r.stdout
    assert "line 11" in r.stdout and "retention window" in r.stdout

    r = pigeon(addr, "events", "list", "crm:1", "--type", "app.close")
    assert r.returncode == 0 and "app.close" in r.stdout and "app.open" not in r.stdout
    r = pigeon(addr, "events", "list", "crm:1", "--type", "app.open")
    assert an_hour_ago.replace("T", " ") in r.stdout and '{"screen": "home"}' in r.stdout
    r = pigeon(addr, "events", "list", "crm:2", "--limit", "5", "--reverse", "--json")
    items = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(items) == 5 and items[0]["seq"] > items[-1]["seq"]


def test_import_from_stdin(server_process):
    data = "\n".join(json.dumps({"identity": "crm:9", "type": "t"}) for _ in range(3))
    r = pigeon(server_process.address, "events", "import", "-", stdin=data)
    assert r.returncode == 0 and "3 event(s) accepted" in r.stdout


def test_health_and_stats(server_process):
    r = pigeon(server_process.address, "health")
    assert r.returncode == 0 and r.stdout.startswith("serving")
    r = pigeon(server_process.address, "stats")
    assert r.returncode == 0
    assert "ACTOR" in r.stdout and "store" in r.stdout and "listener" in r.stdout
    stats = json.loads(pigeon(server_process.address, "stats", "--json").stdout)
    assert {a["name"] for a in stats["actors"]} >= {"store", "ingestion", "journeys", "delivery", "reporting", "listener"}


def test_timeout_bounds_each_call_not_a_long_import(server_process, tmp_path):
    path = tmp_path / "many.jsonl"
    line = json.dumps({"identity": "crm:1", "type": "page.view", "data": {"n": 1}})
    path.write_text((line + "\n") * 200_000)
    started = time.monotonic()
    r = pigeon(server_process.address, "events", "import", str(path), "--timeout", "1")
    assert r.returncode == 0, r.stderr
    assert "200000 event(s) accepted" in r.stdout
    assert time.monotonic() - started > 1  # longer than --timeout, and not cut off


def test_import_of_a_missing_file_is_a_usage_error(server_process, tmp_path):
    r = pigeon(server_process.address, "events", "import", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "No such file" in r.stderr


def test_an_ios_app_and_a_push_from_the_cli(spawn_server, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from plugins.apns.mock import MockApnsProcess, SigningKey

    key = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
    alive, dead = "ab" * 32, "cd" * 32
    config = {"keys": [key.spec()], "tokens": {alive: ["com.acme.app"]}}
    with MockApnsProcess(tmp_path / "apns", config=config) as mock:
        proc = spawn_server(env={"PIGEON_APNS__SANDBOX__ADDRESS": mock.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(mock.ca_file)})
        addr = proc.address
        p8 = tmp_path / "AuthKey_ABC123DEFG.p8"
        p8.write_text(key.private_key_pem)
        r = pigeon(addr, "apps", "register-ios", "com.acme.app", "--p8", str(p8), "--key-id", key.key_id,
                   "--team-id", key.team_id, "--environment", "sandbox")
        assert r.returncode == 0, r.stderr
        assert "bundle com.acme.app, sandbox, token auth" in r.stdout and "key id ABC123DEFG" in r.stdout
        assert "PRIVATE KEY" not in r.stdout
        r = pigeon(addr, "apps", "list")
        assert r.returncode == 0 and "app com.acme.app" in r.stdout

        rsa_key = tmp_path / "rsa.p8"
        rsa_key.write_bytes(
            rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        r = pigeon(addr, "apps", "register-ios", "com.other.app", "--p8", str(rsa_key), "--key-id", key.key_id,
                   "--team-id", key.team_id)
        assert r.returncode == 1 and "$.auth.key_pem" in r.stderr and "P-256" in r.stderr
        assert "PRIVATE KEY" not in r.stderr

        assert pigeon(addr, "tokens", "register", "crm:1", "--app", "com.acme.app", "--platform", "apns-sandbox",
                      "--token", alive).returncode == 0
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--identity", "crm:1", "--title", "Hi", "--body", "There")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[1].startswith("sent")
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--token", dead, "--platform", "apns-sandbox",
                   "--title", "x", "--json")
        assert r.returncode == 1
        [outcome] = json.loads(r.stdout)["outcomes"]
        assert (outcome["status"], outcome["reason"]) == ("invalid", "BadDeviceToken")
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--token", alive, "--platform", "apns-sandbox",
                   "--raw", '{"aps": {"alert": "raw"}}')
        assert r.returncode == 0, r.stdout + r.stderr
        assert [a["payload"] for a in mock.admin.accepted()] == [
            {"aps": {"alert": {"title": "Hi", "body": "There"}}},
            {"aps": {"alert": "raw"}},
        ]

        r = pigeon(addr, "apps", "delete", "com.acme.app")
        assert r.returncode == 0 and "deleted app com.acme.app" in r.stdout
        r = pigeon(addr, "apps", "get", "com.acme.app")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    # The key never reaches the log.
    secret = key.private_key_pem.splitlines()[1]
    assert proc.log and secret not in "".join(proc.log)


def test_mock_apns_runs_from_the_cli(tmp_path):
    command = [sys.executable, "-m", "server._cli", "mock-apns", "--dir", str(tmp_path / "apns"), "--listen", "127.0.0.1:0",
               "--environment", "production", "--exit-on-stdin-eof"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert line.startswith("mock-apns ready on 127.0.0.1:"), line
            assert (tmp_path / "apns" / "ca.pem").is_file()
            proc.stdin.close()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    r = subprocess.run([sys.executable, "-m", "server._cli", "mock-apns", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "pigeon mock-apns" in r.stdout and "--workers" in r.stdout


def test_an_android_app_and_one_push_to_every_device_of_a_profile(spawn_server, tmp_path):
    from plugins.apns.mock import MockApnsProcess, SigningKey
    from plugins.fcm.mock import MockFcmProcess, ServiceAccount

    key = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
    account = ServiceAccount.generate("acme-push")
    ios_token, android_token, gone = "ab" * 32, "fcm-token-1", "fcm-token-2"
    apns_config = {"keys": [key.spec()], "tokens": {ios_token: ["com.acme.app"]}}
    fcm_config = {"projects": {"acme-push": {"service_accounts": [account.spec()],
                                             "tokens": {android_token: {}, gone: {"unregistered": True}}}}}
    with MockApnsProcess(tmp_path / "apns", config=apns_config) as apns, MockFcmProcess(tmp_path / "fcm", config=fcm_config) as fcm:
        proc = spawn_server(env={
            "PIGEON_APNS__SANDBOX__ADDRESS": apns.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(apns.ca_file),
            "PIGEON_FCM__URL": fcm.url, "PIGEON_FCM__TOKEN_URI": fcm.token_uri, "PIGEON_FCM__CA_FILE": str(fcm.ca_file),
        })
        addr = proc.address
        p8 = tmp_path / "key.p8"
        p8.write_text(key.private_key_pem)
        sa = tmp_path / "service-account.json"
        sa.write_text(json.dumps(account.info(fcm.token_uri)))
        assert pigeon(addr, "apps", "register-ios", "com.acme.app", "--p8", str(p8), "--key-id", key.key_id,
                      "--team-id", key.team_id, "--environment", "sandbox").returncode == 0
        r = pigeon(addr, "apps", "register-android", "com.acme.app", "--service-account", str(sa))
        assert r.returncode == 0, r.stderr
        assert "android: package com.acme.app, Firebase project acme-push" in r.stdout
        assert f"service account {account.client_email}" in r.stdout and "PRIVATE KEY" not in r.stdout
        (tmp_path / "bad.json").write_text("{not json")
        r = pigeon(addr, "apps", "register-android", "x.app", "--service-account", str(tmp_path / "bad.json"))
        assert r.returncode == 2 and "is not JSON" in r.stderr

        for platform, token in (("apns-sandbox", ios_token), ("fcm", android_token), ("fcm", gone)):
            assert pigeon(addr, "tokens", "register", "crm:1", "--app", "com.acme.app", "--platform", platform,
                          "--token", token).returncode == 0
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--identity", "crm:1", "--title", "Hi", "--body", "There",
                   "--fcm-channel-id", "news", "--fcm-ttl-s", "600", "--json")
        outcomes = {o["token"]: (o["platform"], o["status"], o.get("reason")) for o in json.loads(r.stdout)["outcomes"]}
        assert outcomes == {
            ios_token: ("apns-sandbox", "sent", None),
            android_token: ("fcm", "sent", None),
            gone: ("fcm", "invalid", "UNREGISTERED"),
        }
        assert r.returncode == 1  # not everything was sent
        [message] = [a["message"] for a in fcm.admin.accepted()]
        assert message["notification"] == {"title": "Hi", "body": "There"}
        assert message["android"]["notification"]["channel_id"] == "news" and message["android"]["ttl"] == "600s"
        assert [a["payload"]["aps"]["alert"] for a in apns.admin.accepted()] == [{"title": "Hi", "body": "There"}]
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--token", android_token, "--platform", "fcm",
                   "--fcm-raw", '{"data": {"sync": "1"}}')
        assert r.returncode == 0, r.stdout + r.stderr
        r = pigeon(addr, "push", "send", "--app", "com.acme.app", "--token", android_token, "--platform", "fcm",
                   "--title", "x", "--fcm-color", "red")
        assert r.returncode == 2 and "a colour like #ff8800" in r.stderr
    secret = account.private_key_pem.splitlines()[1]
    assert proc.log and secret not in "".join(proc.log)


def test_mock_fcm_runs_from_the_cli(tmp_path):
    command = [sys.executable, "-m", "server._cli", "mock-fcm", "--dir", str(tmp_path / "fcm"), "--listen", "127.0.0.1:0"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            assert line.startswith("mock-fcm ready on 127.0.0.1:"), line
            assert (tmp_path / "fcm" / "ca.pem").is_file()
            proc.terminate()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_pigeon_demo_runs_the_whole_flow(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server._cli", "demo", "--data", str(tmp_path / "demo"), "--profiles", "14"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ios (com.example.pigeon-demo)" in out and "android (com.example.pigeon-demo)" in out
    assert "report for welcome-back:" in out
    [summary] = [line for line in out.splitlines() if line.startswith("message welcome-back v1, execution")]
    assert "15 profile(s), 15 targeted" in summary and "bounced" in summary
    [totals] = [line.split() for line in out.splitlines() if line.startswith("all ")]
    targeted, excluded, sent, delivered, failed, bounced, opened, unique_opened, action = map(int, totals[1:])
    assert targeted == excluded + sent and sent == delivered + failed
    assert bounced >= 1 and opened >= 1 and (tmp_path / "demo" / "data").is_dir()
    assert unique_opened == opened  # one device per profile, each opened once at most


def test_a_registration_evicted_by_the_cap_is_named(spawn_server):
    addr = spawn_server(env={"PIGEON_STORE__MAX_REGISTRATIONS": "1"}).address
    register = ("tokens", "register", "crm:1", "--app", "com.acme.app", "--platform", "fcm", "--token")
    r = pigeon(addr, *register, "fcm-token-1")
    assert r.returncode == 0 and "evicted" not in r.stdout
    r = pigeon(addr, *register, "fcm-token-2")
    assert r.returncode == 0, r.stderr
    assert "evicted fcm-token-1 for com.acme.app (fcm)" in r.stdout and "store.max_registrations" in r.stdout
    r = pigeon(addr, *register, "fcm-token-3", "--json")
    assert [e["token"] for e in json.loads(r.stdout)["evicted"]] == ["fcm-token-2"]
