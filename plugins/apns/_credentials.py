"""APNs credentials: checked when an app is registered, loaded when a sender starts.

Token auth: a .p8 file (PKCS#8 PEM, EC P-256 private key), a 10-character key id and team id.
Certificate auth: a .p12 with its password, or certificate and key in PEM; the certificate
must be valid now and name the app's topic (Apple lists the topics in the extension
1.2.840.113635.100.6.3.6; the subject's UID names the bundle id).

Error messages name what is wrong and never quote the secret.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID, ObjectIdentifier

from protocols import api
from server import InvalidArgument
from server.channels import CredentialsError, IosRecord

__all__ = ["check_ios", "recheck_ios", "CredentialsError", "ProviderToken", "client_ssl_context", "APPLE_TOPICS_OID"]

#: Apple's certificate extension listing the topics a push certificate may use.
APPLE_TOPICS_OID = ObjectIdentifier("1.2.840.113635.100.6.3.6")
_UID = ObjectIdentifier("0.9.2342.19200300.100.1.1")


def check_ios(request: api.RegisterIosApp, *, now: datetime | None = None) -> IosRecord:
    """Check the credentials of ``request`` and return the record to store.

    Raises:
        InvalidArgument: naming the field and the problem (never the secret itself).
    """
    now = now or datetime.now(UTC)
    bundle_id = request.bundle_id or request.app
    auth = request.auth
    if isinstance(auth, api.ApnsTokenAuth):
        key = _load_p8(auth.key_pem)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return IosRecord(
            bundle_id=bundle_id,
            environment=request.environment,
            auth="token",
            key_pem=pem,
            key_id=auth.key_id,
            team_id=auth.team_id,
            updated=now,
        )
    private_key, certificate = _load_certificate(auth)
    if certificate.not_valid_after_utc <= now:
        raise InvalidArgument(
            f"$.auth: the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}", field="$.auth"
        )
    if certificate.not_valid_before_utc > now:
        raise InvalidArgument(
            f"$.auth: the certificate is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}", field="$.auth"
        )
    topics = certificate_topics(certificate)
    uids = [a.value for a in certificate.subject.get_attributes_for_oid(_UID)]
    common = " ".join(str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    if topics:
        if bundle_id not in topics:
            raise InvalidArgument(
                f"$.auth: the certificate is for {', '.join(topics)}, not {bundle_id}", field="$.auth"
            )
    elif bundle_id not in uids and not common.endswith(bundle_id):
        raise InvalidArgument(f"$.auth: the certificate does not name the topic {bundle_id}", field="$.auth")
    chain = certificate.public_bytes(serialization.Encoding.PEM) + private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return IosRecord(
        bundle_id=bundle_id,
        environment=request.environment,
        auth="certificate",
        certificate_pem=chain.decode(),
        certificate_subject=certificate.subject.rfc4514_string(),
        certificate_expires=certificate.not_valid_after_utc,
        certificate_topics=topics,
        updated=now,
    )


def recheck_ios(record: IosRecord, *, now: datetime | None = None) -> None:
    """Check stored credentials again before a sender opens connections with them.

    Raises:
        CredentialsError: naming what is wrong.
    """
    now = now or datetime.now(UTC)
    if record.auth == "certificate":
        expires = record.certificate_expires
        if expires is not None and expires <= now:
            raise CredentialsError(
                f"the APNs certificate expired on {expires:%Y-%m-%d}; register the app again with a new one",
                "CertificateExpired",
            )
        if not record.certificate_pem:
            raise CredentialsError("the app has certificate auth but no certificate is stored")
        try:
            client_ssl_context(record, ca_file=None)
        except (ssl.SSLError, ValueError) as exc:
            raise CredentialsError(f"the stored APNs certificate cannot be loaded ({type(exc).__name__})") from None
    else:
        if not (record.key_pem and record.key_id and record.team_id):
            raise CredentialsError("the app has token auth but its key, key id or team id is missing")
        try:
            key = serialization.load_pem_private_key(record.key_pem.encode(), password=None)
        except (ValueError, TypeError):
            raise CredentialsError("the stored APNs key cannot be loaded") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CredentialsError("the stored APNs key is not an EC P-256 key")


def _load_p8(text: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "$.auth.key_pem: not a PEM private key without a password (the .p8 file Apple issued)",
            field="$.auth.key_pem",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise InvalidArgument(
            f"$.auth.key_pem: APNs keys are EC P-256 (prime256v1) keys; this one is {kind}", field="$.auth.key_pem"
        )
    return key


def _load_certificate(auth: api.ApnsCertificateAuth) -> tuple[PrivateKeyTypes, x509.Certificate]:
    if (auth.pkcs12 is None) == (auth.pem is None):
        raise InvalidArgument("$.auth: give either pkcs12 (with its password) or pem", field="$.auth")
    if auth.pkcs12 is not None:
        try:
            key, certificate, _ = pkcs12.load_key_and_certificates(
                auth.pkcs12, auth.password.encode() if auth.password is not None else None
            )
        except (ValueError, TypeError):
            raise InvalidArgument(
                "$.auth.pkcs12: cannot open it: the password is wrong or it is not a .p12 file", field="$.auth.pkcs12"
            ) from None
        if key is None or certificate is None:
            raise InvalidArgument("$.auth.pkcs12: it must hold a certificate and its private key", field="$.auth.pkcs12")
    else:
        assert auth.pem is not None
        data = auth.pem.encode()
        try:
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise InvalidArgument("$.auth.pem: no PEM certificate found", field="$.auth.pem") from None
        try:
            key = serialization.load_pem_private_key(
                data, password=auth.password.encode() if auth.password is not None else None
            )
        except (ValueError, TypeError):
            raise InvalidArgument(
                "$.auth.pem: no private key found, or its password is wrong", field="$.auth.pem"
            ) from None
    public = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != public:
        raise InvalidArgument("$.auth: the private key does not belong to the certificate", field="$.auth")
    return key, certificate


def certificate_topics(certificate: x509.Certificate) -> list[str]:
    """The topics in Apple's extension: the UTF8Strings directly inside its SEQUENCE."""
    try:
        value = certificate.extensions.get_extension_for_oid(APPLE_TOPICS_OID).value
    except x509.ExtensionNotFound:
        return []
    data = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    tag, body, _ = _der(data, 0)
    if tag != 0x30:
        return []
    topics = []
    offset = 0
    while offset < len(body):
        tag, content, offset = _der(body, offset)
        if tag == 0x0C:  # UTF8String
            topics.append(content.decode("utf-8", "replace"))
    return topics


def _der(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One DER element at ``offset``: (tag, content, offset after it)."""
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    return tag, data[offset : offset + length], offset + length


class ProviderToken:
    """The APNs provider token (JWT) of one key, shared by a sender's connections.

    Renewed when 50 minutes old (Apple: between 20 and 60), never more than once in 20
    minutes unless APNs says it expired (`renew_now`).
    """

    RENEW_AFTER = 50 * 60
    MIN_AGE = 20 * 60

    def __init__(self, record: IosRecord, *, clock: Callable[[], float] = time.time) -> None:
        assert record.key_pem and record.key_id and record.team_id
        key = serialization.load_pem_private_key(record.key_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # check_ios stores only EC P-256 keys
        self._key = key
        self._key_id = record.key_id
        self._team_id = record.team_id
        self._clock = clock
        self._value = b""
        self._issued: float = -1e18
        self.renewals = 0

    def header(self) -> bytes:
        """``bearer <jwt>``, renewed first if it is due."""
        if self._clock() - self._issued >= self.RENEW_AFTER:
            self._renew()
        return self._value

    @property
    def age(self) -> float:
        return self._clock() - self._issued

    def renew_now(self) -> bool:
        """Renew because APNs said the token expired; False if it is younger than 20 minutes
        (renewing it again would make APNs refuse it as TooManyProviderTokenUpdates)."""
        if self.age < self.MIN_AGE:
            return False
        self._renew()
        return True

    def _renew(self) -> None:
        now = int(self._clock())
        token = jwt.encode({"iss": self._team_id, "iat": now}, self._key, algorithm="ES256", headers={"kid": self._key_id})
        self._value = b"bearer " + token.encode()
        self._issued = now
        self.renewals += 1


def client_ssl_context(record: IosRecord, *, ca_file: str | None) -> ssl.SSLContext:
    """TLS settings for APNs: the system's trust store (or ``ca_file``) and, for certificate
    auth, the client certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if record.auth == "certificate":
        assert record.certificate_pem
        # ssl loads certificates from files only: an anonymous in-memory file where there is
        # one (Linux), else a private temporary file, removed at once.
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("pigeon-apns-certificate")
            try:
                os.write(fd, record.certificate_pem.encode())
                context.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:
            fd, path = tempfile.mkstemp(prefix="pigeon-apns-", suffix=".pem")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(record.certificate_pem)
                context.load_cert_chain(path)
            finally:
                os.unlink(path)
    return context
