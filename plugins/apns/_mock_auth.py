"""The credentials the mock APNs checks (`plugins.apns.mock`): provider signing keys and their
tokens (ES256 JWTs), and "Apple Push Services"-like TLS client certificates; also their makers
for tests (`SigningKey`, `issue_client_certificate`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from plugins._mock_tls import issue, key_pem, load_or_create_ca, locked, public_key_from_pem, public_key_pem

__all__ = [
    "CertInfo",
    "JwtEntry",
    "PRODUCTION_OID",
    "PUSH_TYPE_SUFFIX",
    "SANDBOX_OID",
    "TOPIC_OID",
    "ProviderKey",
    "SigningKey",
    "issue_client_certificate",
    "parse_keys",
    "read_certificate",
    "verify_jwt",
]

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

#: Apple's certificate extensions: the topic list, and the environment markers.
TOPIC_OID = ObjectIdentifier("1.2.840.113635.100.6.3.6")
SANDBOX_OID = ObjectIdentifier("1.2.840.113635.100.6.3.1")
PRODUCTION_OID = ObjectIdentifier("1.2.840.113635.100.6.3.2")

#: Push type -> the suffix its apns-topic must carry (None: the bundle ID itself, or anything for mdm).
PUSH_TYPE_SUFFIX: dict[bytes, bytes | None] = {
    b"alert": None,
    b"background": None,
    b"complication": b".complication",
    b"controls": b".push-type.controls",
    b"fileprovider": b".pushkit.fileprovider",
    b"liveactivity": b".push-type.liveactivity",
    b"location": b".location-query",
    b"mdm": None,
    b"pushtotalk": b".voip-ptt",
    b"voip": b".voip",
    b"widgets": b".push-type.widgets",
}
_TOPIC_SUFFIXES = sorted({s for s in PUSH_TYPE_SUFFIX.values() if s}, key=len, reverse=True)


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """A signing key the mock trusts (its public half), for a team, maybe restricted to topics
    and to one environment."""

    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: frozenset[bytes] | None
    environment: str | None

    def covers(self, topic: bytes) -> bool:
        if self.topics is None or topic in self.topics:
            return True
        for suffix in _TOPIC_SUFFIXES:
            if topic.endswith(suffix) and topic[: -len(suffix)] in self.topics:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        pem = self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {
            "key_id": self.key_id,
            "team_id": self.team_id,
            "public_key_pem": pem.decode(),
            "topics": None if self.topics is None else sorted(t.decode() for t in self.topics),
            "environment": self.environment,
        }


def _parse_key(spec: Any) -> ProviderKey:
    if not isinstance(spec, dict):
        raise TypeError("a key must be a JSON object")
    key_id, team_id, pem = spec.get("key_id"), spec.get("team_id"), spec.get("public_key_pem")
    if not (isinstance(key_id, str) and key_id and isinstance(team_id, str) and team_id and isinstance(pem, str)):
        raise ValueError("a key needs key_id, team_id and public_key_pem strings")
    try:
        public = public_key_from_pem(pem)
    except ValueError as exc:
        raise ValueError(f"key {key_id}: public_key_pem is not a PEM key") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TypeError(f"key {key_id}: not a P-256 key (ES256 needs one)")
    topics = spec.get("topics")
    if topics is not None and not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
        raise ValueError(f"key {key_id}: topics must be a list of strings or null")
    environment = spec.get("environment")
    if environment not in (None, "sandbox", "production"):
        raise ValueError(f"key {key_id}: environment must be sandbox, production or null")
    unknown = set(spec) - {"key_id", "team_id", "public_key_pem", "topics", "environment"}
    if unknown:
        raise ValueError(f"key {key_id}: unknown fields {sorted(unknown)}")
    return ProviderKey(key_id, team_id, public, None if topics is None else frozenset(t.encode() for t in topics), environment)


def parse_keys(doc: Any) -> dict[str, ProviderKey]:
    if isinstance(doc, dict) and set(doc) == {"keys"}:
        doc = doc["keys"]
    if not isinstance(doc, list):
        raise TypeError("keys must be a list (or {'keys': [...]})")
    keys = [_parse_key(spec) for spec in doc]
    return {key.key_id: key for key in keys}


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a client certificate allows: its topics and environments."""

    topics: tuple[bytes, ...]
    environments: frozenset[str]


def _der_read(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, content) of each DER element in ``data``."""
    i = 0
    while i < len(data):
        tag = data[i]
        length = data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i : i + count], "big")
            i += count
        yield tag, data[i : i + length]
        i += length


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def read_certificate(der: bytes) -> CertInfo:
    cert = x509.load_der_x509_certificate(der)
    topics: list[bytes] = []
    try:
        value = cert.extensions.get_extension_for_oid(TOPIC_OID).value
    except x509.ExtensionNotFound:
        pass
    else:
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        for tag, content in _der_read(raw):
            if tag == 0x30:
                topics.extend(c for t, c in _der_read(content) if t == 0x0C)
    if not topics:
        topics = [str(a.value).encode() for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)]
    oids = {ext.oid for ext in cert.extensions}
    environments = {name for oid, name in ((SANDBOX_OID, "sandbox"), (PRODUCTION_OID, "production")) if oid in oids}
    return CertInfo(tuple(topics), frozenset(environments or ("sandbox", "production")))


def _b64url_decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _verify_es256(public_key: ec.EllipticCurvePublicKey, signed: bytes, signature: bytes) -> bool:
    """Both JWS raw R||S (64 bytes) and ASN.1 DER signatures, as APNs accepts both."""
    candidates = [signature]
    if len(signature) == 64:
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        candidates.insert(0, encode_dss_signature(r, s))
    for der in candidates:
        try:
            public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


#: What `verify_jwt` finds in a provider token: (the reason it is refused or None, its key, its iat).
JwtEntry = tuple[bytes | None, ProviderKey | None, int]
_INVALID_TOKEN: JwtEntry = (b"InvalidProviderToken", None, 0)


def verify_jwt(keys: dict[str, ProviderKey], token: bytes) -> JwtEntry:
    """Check a provider token's form, algorithm, key, signature and issuer (not its age)."""
    try:
        h64, c64, s64 = token.split(b".")
        header = _json_decode(_b64url_decode(h64))
        claims = _json_decode(_b64url_decode(c64))
        signature = _b64url_decode(s64)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        return _INVALID_TOKEN
    if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "ES256":
        return _INVALID_TOKEN
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None or not _verify_es256(key.public_key, h64 + b"." + c64, signature):
        return _INVALID_TOKEN
    iat: Any = claims.get("iat")  # JSON: checked next
    if claims.get("iss") != key.team_id or type(iat) not in (int, float):
        return _INVALID_TOKEN
    return (None, key, int(iat))


def issue_client_certificate(
    folder: str | os.PathLike[str],
    topic: str,
    *,
    environment: str,
    voip: bool = False,
    expired: bool = False,
) -> tuple[bytes, bytes]:
    """An "Apple Push Services"-like TLS client certificate signed by the mock CA in ``folder``.

    Args:
        folder: the mock's state directory (its CA is created there if missing).
        topic: the app's bundle ID; subject UID and CN ``Apple Push Services: <topic>``.
        environment: ``sandbox``, ``production`` or ``both`` (Apple's environment extensions
            1.2.840.113635.100.6.3.1 / .2); the mock answers BadCertificateEnvironment otherwise.
        voip: issue a "VoIP Services" certificate whose only topic is ``<topic>.voip`` (so
            requests may omit apns-topic). Otherwise the topic extension
            1.2.840.113635.100.6.3.6 lists ``topic``, ``topic.voip`` and ``topic.complication``.
        expired: make it expired a day ago (the TLS handshake then fails, as with APNs).

    Returns:
        (certificate PEM, private key PEM).
    """
    if environment not in ("sandbox", "production", "both"):
        raise ValueError("environment must be sandbox, production or both")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        ca_key, ca_cert = load_or_create_ca(folder)
    if voip:
        topics = [(f"{topic}.voip", "voip")]
        common_name = f"VoIP Services: {topic}"
    else:
        topics = [(topic, "app"), (f"{topic}.voip", "voip"), (f"{topic}.complication", "complication")]
        common_name = f"Apple Push Services: {topic}"
    topic_der = _der(
        0x30, b"".join(_der(0x0C, t.encode()) + _der(0x30, _der(0x0C, kind.encode())) for t, kind in topics)
    )
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.UnrecognizedExtension(TOPIC_OID, topic_der), False),
    ]
    if environment in ("sandbox", "both"):
        extensions.append((x509.UnrecognizedExtension(SANDBOX_OID, b"\x05\x00"), False))
    if environment in ("production", "both"):
        extensions.append((x509.UnrecognizedExtension(PRODUCTION_OID, b"\x05\x00"), False))
    now = dt.datetime.now(dt.UTC)
    if expired:
        not_before, not_after = now - dt.timedelta(days=366), now - dt.timedelta(days=1)
    else:
        not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=365)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, topic),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "MOCKTEAM01"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pigeon mock"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    return issue(ca_key, ca_cert, subject, extensions=extensions, not_before=not_before, not_after=not_after)


@dataclass(frozen=True)
class SigningKey:
    """A provider signing key (the ``.p8`` of Apple's token auth) for tests.

    ``SigningKey.generate()`` makes one; ``spec()`` is its entry for the mock's keys;
    ``token()`` mints a provider token (JWT) signed with it.
    """

    key_id: str
    team_id: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, key_id: str = "MOCKKEY001", team_id: str = "MOCKTEAM01") -> SigningKey:
        return cls(key_id, team_id, ec.generate_private_key(ec.SECP256R1()))

    @property
    def private_key_pem(self) -> str:
        return key_pem(self.private_key).decode()

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.private_key).decode()

    def spec(self, topics: Iterable[str] | None = None, environment: str | None = None) -> dict[str, Any]:
        """This key as an entry of the mock's ``keys`` (``topics=None``: team-scoped)."""
        return {
            "key_id": self.key_id,
            "team_id": self.team_id,
            "public_key_pem": self.public_key_pem,
            "topics": None if topics is None else list(topics),
            "environment": environment,
        }

    def token(
        self,
        *,
        iat: float | None = None,
        der: bool = False,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A provider token: ES256, ``kid`` = key_id, ``iss`` = team_id, ``iat`` = now.

        ``der=True`` encodes the signature as ASN.1 DER (like Pushy) instead of raw R||S;
        ``header``/``claims`` override or add fields.
        """
        head = {"alg": "ES256", "kid": self.key_id, **(header or {})}
        body = {"iss": self.team_id, "iat": int(time.time() if iat is None else iat), **(claims or {})}
        signing_input = f"{_b64url(_json_encode(head))}.{_b64url(_json_encode(body))}"
        signature = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        if not der:
            r, s = decode_dss_signature(signature)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64url(signature)}"
