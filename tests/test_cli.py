"""The ``pigeon`` command line against a real server process."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import api
from server.cli.parser import COMMANDS, build_parser as _build_parser


def pigeon(address: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--server", address],
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
    # Bad input exits 2 whoever finds it: the server (INVALID_ARGUMENT) or the CLI.
    r = pigeon(addr, "profiles", "get", "nope")
    assert r.returncode == 2 and "$.identity" in r.stderr and "identity like crm:42" in r.stderr
    r = pigeon(addr, "profiles", "upsert", "crm:1", "[1, 2]")
    assert r.returncode == 2 and "must be a JSON object" in r.stderr
    r = pigeon(addr, "events", "send", "crm:1", "bad type!")
    assert r.returncode == 2 and "$.type" in r.stderr


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
    assert re.search(r"journeys: 0 live, 0 entered, 0 steps, 0 timers fired, 0 quarantined; event log read to \d+ of "
                     r"\d+", r.stdout), r.stdout
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
        assert r.returncode == 2 and f"--p8 {rsa_key}: " in r.stderr and "P-256" in r.stderr
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
    command = [sys.executable, "-m", "server.cli", "mock-apns", "--dir", str(tmp_path / "apns"), "--listen", "127.0.0.1:0",
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
    r = subprocess.run([sys.executable, "-m", "server.cli", "mock-apns", "--help"], capture_output=True, text=True, timeout=60)
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
    command = [sys.executable, "-m", "server.cli", "mock-fcm", "--dir", str(tmp_path / "fcm"), "--listen", "127.0.0.1:0"]
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


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``pigeon ARGS`` as they are (options where the test puts them)."""
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help_without_a_command():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("pigeon ") and "protocol 1" in r.stdout
    r = cli()  # bare `pigeon`: the help, not only a usage error
    assert r.returncode == 2
    assert "serve" in r.stdout and "messages" in r.stdout and "--version" in r.stdout and r.stderr == ""
    r = cli("profiles")  # a group without its subcommand: the group's help
    assert r.returncode == 2 and "upsert" in r.stdout and "merge-patch" in r.stdout


def test_client_options_come_before_or_after_the_command(server_process):
    addr = server_process.address
    assert pigeon(addr, "profiles", "upsert", "crm:7", '{"n": 1}').returncode == 0
    before = cli("--json", "--server", addr, "--timeout", "10", "profiles", "get", "crm:7")
    after = cli("profiles", "get", "crm:7", "--json", "--server", addr, "--timeout", "10")
    mixed = cli("--server", addr, "profiles", "get", "--json", "crm:7")
    assert before.returncode == after.returncode == mixed.returncode == 0, before.stderr + after.stderr + mixed.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(mixed.stdout)
    assert json.loads(before.stdout)["attributes"] == {"n": 1}


def test_json_registrations_carry_the_state_the_text_view_shows(server_process):
    addr = server_process.address
    assert pigeon(addr, "tokens", "register", "crm:8", "--app", "com.acme.app", "--platform", "fcm", "--token", "t-1").returncode == 0
    text = pigeon(addr, "profiles", "get", "crm:8").stdout
    [registration] = json.loads(pigeon(addr, "profiles", "get", "crm:8", "--json").stdout)["registrations"]
    assert "active" in text
    assert registration["state"] == "active" and registration["invalid_reason"] is None


def test_a_closed_output_ends_the_command_quietly(server_process):
    addr = server_process.address
    lines = "".join(json.dumps({"identity": "crm:9", "type": "page.view", "data": {"n": i}}) + "\n" for i in range(3000))
    assert pigeon(addr, "events", "import", "-", stdin=lines).returncode == 0
    # About 150 KB of output, more than a pipe holds: the command is still writing when the reader goes.
    with subprocess.Popen([sys.executable, "-m", "server.cli", "events", "list", "crm:9", "--limit", "3000", "--server", addr],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert "page.view" in proc.stdout.readline()
        proc.stdout.close()  # as `pigeon events list ... | head -1` does
        err = proc.stderr.read()
        assert proc.wait(60) == 141  # as for Unix tools (128 + SIGPIPE)
    assert err == ""


def test_nothing_listening_says_to_start_a_server(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"unix:{tmp_path / 'pigeon.sock'}"):
        r = cli("health", "--server", address)
        assert r.returncode == 1
        assert f"no server is listening at {address}" in r.stderr and "`pigeon serve`" in r.stderr


@pytest.fixture
def http_server():
    """Python's own HTTP server on a free port: it reads a request line and never answers ours."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_server_is_named_as_not_pigeon(http_server):
    r = cli("health", "--server", http_server, "--timeout", "2")
    assert r.returncode == 1
    assert f"{http_server} is not a Pigeon server: it answered in HTTP (HTTP/1.0 200 OK)" in r.stderr, r.stderr


def test_a_server_that_answers_in_http_at_once_is_named_as_not_pigeon():
    # Like nginx: a request line that is not HTTP is answered with 400 at once.
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        r = cli("health", "--server", address, "--timeout", "10")
    finally:
        thread.join(10)
        listener.close()
    assert r.returncode == 1
    assert f"{address} is not a Pigeon server: it answered in HTTP (HTTP/1.1 400 Bad Request)" in r.stderr, r.stderr


def test_a_tls_port_spoken_to_without_tls_says_to_use_tls(spawn_server, tmp_path):
    from .conftest import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    proc = spawn_server(env={"PIGEON_TLS_CERT": str(cert), "PIGEON_TLS_KEY": str(key)})
    r = cli("health", "--server", proc.address, "--timeout", "10")
    assert r.returncode == 1
    assert f"{proc.address} speaks TLS: use --tls" in r.stderr, r.stderr
    assert cli("health", "--server", proc.address, "--ca", str(cert)).returncode == 0


def test_bad_input_files_exit_2_whoever_finds_the_fault(server_process, tmp_path):
    from plugins.apns.mock import SigningKey

    addr = server_process.address
    key = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
    (tmp_path / "key.p8").write_text(key.private_key_pem)
    assert pigeon(addr, "apps", "register-ios", "com.acme.app", "--p8", str(tmp_path / "key.p8"), "--key-id", key.key_id,
                  "--team-id", key.team_id).returncode == 0
    (tmp_path / "config.yaml").write_text("name: shop-push\napps: [com.acme.app]\n")
    assert pigeon(addr, "configs", "publish", str(tmp_path / "config.yaml")).returncode == 0
    (tmp_path / "typo.yaml").write_text("id: cart\nchannel: shop-push\ncontent: {titel: Hi}\n")
    (tmp_path / "template.yaml").write_text("id: cart\nchannel: shop-push\ncontent: {title: '{{ profile.name'}\n")
    typo = pigeon(addr, "messages", "publish", str(tmp_path / "typo.yaml"))  # found by the CLI
    template = pigeon(addr, "messages", "publish", str(tmp_path / "template.yaml"))  # found by the server
    assert typo.returncode == template.returncode == 2, typo.stderr + template.stderr
    assert "typo.yaml: $.content.titel" in typo.stderr
    assert "template.yaml: $.content.title" in template.stderr


def test_a_wrong_credential_file_is_named_by_its_flag(server_process, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    addr = server_process.address
    rsa_key = tmp_path / "AuthKey_ABC123DEFG.p8"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    r = pigeon(addr, "apps", "register-ios", "com.acme.app", "--p8", str(rsa_key), "--key-id", "ABC123DEFG",
               "--team-id", "TEAM123456")
    assert r.returncode == 2
    assert f"pigeon: --p8 {rsa_key}: APNs keys are EC P-256" in r.stderr and "$.auth" not in r.stderr
    r = pigeon(addr, "apps", "register-ios", "com.acme.app", "--p8", str(rsa_key), "--key-id", "short", "--team-id", "TEAM123456")
    assert r.returncode == 2 and "pigeon: --key-id short: " in r.stderr and "$.auth" not in r.stderr
    (tmp_path / "sa.json").write_text('{"type": "service_account"}')
    r = pigeon(addr, "apps", "register-android", "com.acme.app", "--service-account", str(tmp_path / "sa.json"))
    assert r.returncode == 2
    assert f"pigeon: --service-account {tmp_path / 'sa.json'}: project_id: " in r.stderr and "$.service_account" not in r.stderr


def test_deeply_nested_input_is_a_clear_error(server_process, tmp_path):
    addr = server_process.address
    (tmp_path / "deep.yaml").write_text("name: " + "[" * 2000 + "]" * 2000 + "\n")
    r = pigeon(addr, "configs", "publish", str(tmp_path / "deep.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'deep.yaml'}: nested too deeply" in r.stderr
    (tmp_path / "deep.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    r = pigeon(addr, "profiles", "upsert", "crm:1", f"@{tmp_path / 'deep.json'}")
    assert r.returncode == 2 and "attributes is nested too deeply" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "deep.jsonl").write_text('{"identity": "crm:1", "type": "t", "data": {"a": ' + "[" * 5000 + "]" * 5000 + "}}\n")
    r = pigeon(addr, "events", "import", str(tmp_path / "deep.jsonl"))
    assert r.returncode == 1 and "line 1: nested too deeply" in r.stdout and "Traceback" not in r.stderr


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


def test_a_bad_server_address_or_ca_file_is_a_usage_error(tmp_path):
    r = cli("health", "--server", "nonsense")
    assert r.returncode == 2 and "--server: 'nonsense' is not HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    r = cli("health", "--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"))
    assert r.returncode == 2 and f"--ca {tmp_path / 'ca.pem'}: cannot load it" in r.stderr


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=0, max_value=3000), brackets=st.sampled_from(["[]", "{}"]), where=st.sampled_from(["json", "yaml"]))
def test_any_nesting_depth_is_parsed_or_refused_as_bad_input(tmp_path_factory, depth, brackets, where):
    """However deep the input, the CLI's parsers give a value or a UsageError, never a RecursionError."""
    from server.cli.inputs import UsageError, load_document as _load_document, parse_json_object as _parse_json_object

    opening, closing = brackets
    inner = (opening + '"k": ' if opening == "{" else opening) * depth + "1" + closing * depth
    text = '{"a": ' + inner + "}"
    try:
        if where == "json":
            assert _parse_json_object(text, "attributes")["a"] is not None
        else:
            path = tmp_path_factory.mktemp("doc") / "config.yaml"
            path.write_text(f"name: shop-push\napps: [com.acme.app]\ndescription: {inner}\n")
            _load_document(str(path), api.ChannelConfig)
    except UsageError as exc:
        assert "nested too deeply" in str(exc) or "description" in str(exc)


# ---------------------------------------------------------------------------------------------
# API keys


def _pigeon_in(folder, address: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pigeon`` run from ``folder`` (no pigeon.toml, no PIGEON_* of the test run's own)."""
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", address], capture_output=True,
                          text=True, timeout=60, cwd=folder, env={**environment, **(env or {})})


def test_keys_from_the_cli_on_a_server_with_keys(spawn_server, tmp_path):
    """The CLI on the server's machine finds the admin key by itself (through the configuration
    that names the data folder); a key made with it is shown once, listed, refused a scope it
    lacks, and revoked."""
    server = spawn_server(auth="keys")
    addr, cwd = server.address, tmp_path
    here = {"PIGEON_DATA": str(server.data)}
    r = _pigeon_in(cwd, addr, "keys", "create", "ingest", "--name", "ios-app", env=here)
    assert r.returncode == 0, r.stderr
    key = r.stdout.splitlines()[0]
    assert key.startswith("pgn_") and "shown this once" in r.stdout
    r = _pigeon_in(cwd, addr, "keys", "list", env=here)
    assert r.returncode == 0 and "first admin key" in r.stdout and "ios-app" in r.stdout and key[:12] in r.stdout
    assert key not in r.stdout and server.admin_key not in r.stdout

    r = _pigeon_in(cwd, addr, "tokens", "register", "crm:1", "--app", "com.acme", "--platform", "fcm", "--token", "t1",
                   env={"PIGEON_API_KEY": key})
    assert r.returncode == 0, r.stderr
    r = _pigeon_in(cwd, addr, "profiles", "get", "crm:1", "--api-key", key)
    assert r.returncode == 1
    assert "PERMISSION_DENIED: profiles.get needs the operator scope" in r.stderr

    r = _pigeon_in(cwd, addr, "keys", "revoke", key[:12], env=here)
    assert r.returncode == 0 and f"revoked API key {key[:12]}" in r.stdout
    r = _pigeon_in(cwd, addr, "health", "--api-key", key)
    assert r.returncode == 1
    assert f"{addr} refused the API key from --api-key: UNAUTHENTICATED: the API key is not valid" in r.stderr


def test_sandboxes_from_the_cli(spawn_server, tmp_path):
    """An admin of default makes sandbox dev and a key in it; with that key the CLI works in
    dev only; --sandbox names the key's own sandbox or is refused."""
    server = spawn_server(auth="keys")
    addr, cwd = server.address, tmp_path
    here = {"PIGEON_DATA": str(server.data)}
    r = _pigeon_in(cwd, addr, "sandboxes", "create", "dev", env=here)
    assert r.returncode == 0 and "sandbox dev created" in r.stdout, r.stderr
    r = _pigeon_in(cwd, addr, "keys", "create", "admin", "--in", "dev", "--name", "dev-team", env=here)
    assert r.returncode == 0, r.stderr
    dev = r.stdout.splitlines()[0]
    r = _pigeon_in(cwd, addr, "sandboxes", "list", env=here)
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["default", "dev"]
    r = _pigeon_in(cwd, addr, "keys", "list", "--in", "dev", env=here)
    assert "dev-team" in r.stdout and "first admin key" not in r.stdout

    r = _pigeon_in(cwd, addr, "profiles", "upsert", "crm:1", '{"in": "dev"}', "--api-key", dev,
                   "--sandbox", "dev")
    assert r.returncode == 0, r.stderr
    r = _pigeon_in(cwd, addr, "profiles", "get", "crm:1", env=here)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr  # default has no crm:1
    r = _pigeon_in(cwd, addr, "sandboxes", "list", env={"PIGEON_API_KEY": dev})
    assert r.returncode == 1 and "PERMISSION_DENIED: sandboxes are managed with an admin key of sandbox default" in r.stderr
    r = _pigeon_in(cwd, addr, "health", "--api-key", dev, env={"PIGEON_SANDBOX": "default"})
    assert r.returncode == 1 and "UNAUTHENTICATED: this API key does not belong to sandbox 'default'" in r.stderr


def test_the_cli_reads_the_admin_key_of_the_configured_data_folder(tmp_path, monkeypatch):
    """As `pigeon serve` finds its data folder (PIGEON_CONFIG, ./pigeon.toml, PIGEON_DATA), the
    client commands find the admin key file beside it."""
    from server.cli.connect import api_key

    (tmp_path / "data.admin-key").write_text("pgn_" + "c" * 43 + "\n")
    (tmp_path / "pigeon.toml").write_text(f'data = "{tmp_path / "data"}"\n')
    args = _build_parser().parse_args(["health"])
    for name in ("PIGEON_API_KEY", "PIGEON_CONFIG", "PIGEON_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert api_key(args) == ("pgn_" + "c" * 43, f"the admin key file {(tmp_path / 'data.admin-key').resolve()}")
    monkeypatch.setenv("PIGEON_API_KEY", "pgn_" + "e" * 43)
    assert api_key(args) == ("pgn_" + "e" * 43, "PIGEON_API_KEY")
    args = _build_parser().parse_args(["health", "--api-key", "pgn_" + "f" * 43])
    assert api_key(args) == ("pgn_" + "f" * 43, "--api-key")
