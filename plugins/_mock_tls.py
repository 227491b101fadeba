"""TLS for Pigeon's mock provider servers (`plugins.apns.mock`, `plugins.fcm.mock`).

`ensure_certificates` keeps a CA in the state directory (``ca.pem``/``ca.key``, created once and
kept) and issues a fresh server certificate (``server.pem``/``server.key``) for 127.0.0.1, ::1,
localhost and any extra host names at each start. Clients trust a mock with
``cafile=STATE/ca.pem``; two mocks may share one CA. `issue` signs other certificates with that
CA (the mock APNs' client certificates); `server_ssl_context` and `client_ssl_context` are the
two ends' contexts.

The rest of the mocks' shared machinery: `plugins._mock_h2` (the HTTP/2 server connection and
HPACK speed-ups), `plugins._mock_app` (state, admin API, serving), `plugins._mock_process`
(command line, workers) and `plugins._mock_harness` (a mock in a child process for tests, and
its admin clients).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["client_ssl_context", "ensure_certificates", "issue", "key_pem", "load_or_create_ca", "locked", "public_key_from_pem", "public_key_pem", "server_ssl_context", "write_atomic"]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (an exclusive flock): mocks sharing a state directory take turns."""
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary file and a rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """The public half of ``key`` as SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(pem: str) -> PublicKeyTypes:
    """The public key in ``pem``, or the public half of the private key in it (ValueError if
    it holds neither)."""
    try:
        return serialization.load_pem_public_key(pem.encode())
    except ValueError:
        pass
    try:
        return serialization.load_pem_private_key(pem.encode(), None).public_key()
    except (ValueError, TypeError) as exc:
        raise ValueError("not a PEM key") from exc


def load_or_create_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_pem, ca_key = folder / "ca.pem", folder / "ca.key"
    if ca_pem.exists() and ca_key.exists():
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(ca_pem.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Pigeon mock CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pigeon mock"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(ca_key, key_pem(key), 0o600)
    write_atomic(ca_pem, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def ensure_certificates(
    folder: str | os.PathLike[str], hostnames: Iterable[str] = (), *, common_name: str = "pigeon-mock"
) -> Path:
    """Create the mock CA in ``folder`` unless it exists, and issue a fresh server certificate.

    The server certificate (subject CN ``common_name``) names localhost, 127.0.0.1, ::1 and
    ``hostnames`` (DNS names or IP addresses). Returns the CA certificate's path (``folder/ca.pem``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        ca_key, ca_cert = load_or_create_ca(folder)
        names: list[x509.GeneralName] = []
        for host in ("localhost", "127.0.0.1", "::1", *hostnames):
            try:
                general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                general = x509.DNSName(host)
            if general not in names:
                names.append(general)
        now = dt.datetime.now(dt.UTC)
        cert_pem, server_key = issue(
            ca_key,
            ca_cert,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            extensions=[
                (x509.SubjectAlternativeName(names), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            ],
            not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=365),
        )
        write_atomic(folder / "server.key", server_key, 0o600)
        write_atomic(folder / "server.pem", cert_pem)
    return folder / "ca.pem"


def server_ssl_context(folder: Path, alpn: list[str], client_certs: str = "none") -> ssl.SSLContext:
    """The mock's TLS server context: ``folder``'s server certificate, TLS 1.2 or newer, ALPN
    ``alpn``; ``client_certs`` ``optional`` or ``required`` asks for client certificates
    signed by the mock CA (``none``: asks for none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    ctx.set_alpn_protocols(alpn)
    if client_certs != "none":
        ctx.load_verify_locations(folder / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(ca_file: Path, *, alpn: bool = True) -> ssl.SSLContext:
    """A client context trusting the mock CA ``ca_file`` (offering ALPN h2 unless ``alpn=False``)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    return ctx
