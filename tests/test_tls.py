"""The socket protocol over TLS, with a certificate generated for the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols import api
from protocols import asyncio_client
from protocols.trio_client import open_client


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pigeon test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


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


def test_asyncio_client_over_tls(tls_server, certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))

    async def main() -> str:
        async with asyncio_client.open_client(tls_server.address, ssl_context=context) as client:
            return (await client.call(api.GetHealth(), timeout=10)).status

    assert asyncio_client.run(main()) == "serving"


def test_cli_over_tls_and_a_plaintext_client_is_refused(tls_server, certificate):
    r = subprocess.run(
        [sys.executable, "-m", "server._cli", "health", "--server", tls_server.address, "--ca", str(certificate[0])],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith("serving"), r.stderr
    # an untrusted certificate is an error, not a silent downgrade
    r = subprocess.run(
        [sys.executable, "-m", "server._cli", "health", "--server", tls_server.address, "--tls", "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    # a client speaking plaintext gets nothing it can use, and the server keeps serving
    r = subprocess.run(
        [sys.executable, "-m", "server._cli", "health", "--server", tls_server.address, "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1
    r = subprocess.run(
        [sys.executable, "-m", "server._cli", "health", "--server", tls_server.address, "--ca", str(certificate[0])],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0
