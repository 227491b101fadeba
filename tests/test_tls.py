"""The socket protocol over TLS, with a certificate generated for the test (the asyncio
client's TLS tests are in test_asyncio_client)."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest
import trio
from protocols import api
from protocols.trio_client import open_client

from .conftest import self_signed_certificate


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(spawn_server, certificate):
    cert, key = certificate
    return spawn_server(env={"PIGEON_TLS_CERT": str(cert), "PIGEON_TLS_KEY": str(key)})


def test_trio_client_over_tls(tls_server, certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))

    async def main() -> None:
        async with open_client(tls_server.address, ssl_context=context) as client:
            await client.call(api.UpsertProfile(identity="crm:1", attributes={"tls": True}))
            assert (await client.call(api.GetProfile(identity="crm:1"))).attributes == {"tls": True}
            events = [api.Event(identity="crm:1", type="t", data={"n": i}) for i in range(200)]
            await client.call(api.IngestEvents(events=events))
            async with client.stream(api.ListEvents(identity="crm:1", limit=500)) as items:
                assert len([e async for e in items]) == 200

    trio.run(main)


def test_cli_over_tls_and_a_plaintext_client_is_refused(tls_server, certificate):
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "health", "--server", tls_server.address, "--ca", str(certificate[0])],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith("serving"), r.stderr
    # an untrusted certificate is an error, not a silent downgrade
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "health", "--server", tls_server.address, "--tls", "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    # a client speaking plaintext gets nothing it can use, and the server keeps serving
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "health", "--server", tls_server.address, "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "health", "--server", tls_server.address, "--ca", str(certificate[0])],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0
