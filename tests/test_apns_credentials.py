"""APNs credentials: checked when registered, never echoed; the provider token's lifetime."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from plugins.apns._credentials import APPLE_TOPICS_OID, ProviderToken, certificate_topics, check_ios, client_ssl_context
from protocols import api
from server import InvalidArgument

NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)
KEY_ID, TEAM_ID = "ABCDE12345", "TEAM123456"


def p8(curve: ec.EllipticCurve = ec.SECP256R1()) -> str:
    key = ec.generate_private_key(curve)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def token_request(key_pem: str, **kw) -> api.RegisterIosApp:
    return api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsTokenAuth(key_pem=key_pem, key_id=KEY_ID, team_id=TEAM_ID), **kw)


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    return b"\x0c" + bytes([len(data)]) + data


def _der_seq(*items: bytes) -> bytes:
    body = b"".join(items)
    return b"\x30" + (bytes([len(body)]) if len(body) < 128 else b"\x81" + bytes([len(body)])) + body


def push_certificate(topic: str, *, days: int = 365, start_days_ago: int = 1, topics: list[str] | None = None):
    """An Apple-like push certificate (self-signed): (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(x509.ObjectIdentifier("0.9.2342.19200300.100.1.1"), topic),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
    ])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=start_days_ago)).not_valid_after(NOW + dt.timedelta(days=days))
    )
    if topics is not None:
        value = _der_seq(*[part for t in topics for part in (_der_utf8(t), _der_seq(_der_utf8("app")))])
        builder = builder.add_extension(x509.UnrecognizedExtension(APPLE_TOPICS_OID, value), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def test_a_valid_p8_key_is_accepted_and_normalized():
    record = check_ios(token_request(p8()), now=NOW)
    assert (record.auth, record.key_id, record.team_id, record.bundle_id, record.environment) == (
        "token", KEY_ID, TEAM_ID, "com.acme.shop", "both")
    assert record.key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    info = record.info()
    assert "key_pem" not in api.IosAppInfo.__struct_fields__ and info.key_id == KEY_ID


@pytest.mark.parametrize(
    "key_pem, problem",
    [
        ("not a key", "not a PEM private key"),
        (p8(ec.SECP384R1()), "P-256"),
        (rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(), "P-256"),
    ],
)
def test_bad_keys_are_named_and_not_echoed(key_pem, problem):
    with pytest.raises(InvalidArgument) as info:
        check_ios(token_request(key_pem), now=NOW)
    assert problem in info.value.message and info.value.field == "$.auth.key_pem"
    if len(key_pem) > 60:
        assert key_pem[30:60] not in info.value.message


def test_key_and_team_ids_must_be_ten_characters():
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="key_id"):
        msgspec.convert({"kind": "token", "key_pem": "x", "key_id": "short", "team_id": TEAM_ID}, api.ApnsTokenAuth)


def test_a_pem_certificate_naming_the_topic_is_accepted():
    certificate, key = push_certificate("com.acme.shop", topics=["com.acme.shop", "com.acme.shop.voip"])
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    request = api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pem=pem.decode()))
    record = check_ios(request, now=NOW)
    assert record.auth == "certificate" and record.certificate_topics == ["com.acme.shop", "com.acme.shop.voip"]
    assert record.certificate_expires == certificate.not_valid_after_utc
    assert "com.acme.shop" in record.certificate_subject
    assert certificate_topics(certificate) == ["com.acme.shop", "com.acme.shop.voip"]
    # the stored chain loads as a TLS client certificate
    client_ssl_context(record, ca_file=None)


def test_a_p12_with_its_password_is_accepted_and_a_wrong_password_named():
    certificate, key = push_certificate("com.acme.shop")
    blob = pkcs12.serialize_key_and_certificates(
        b"push", key, certificate, None, serialization.BestAvailableEncryption(b"s3cret"))
    ok = api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pkcs12=blob, password="s3cret"))
    assert check_ios(ok, now=NOW).auth == "certificate"
    bad = api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pkcs12=blob, password="wrong"))
    with pytest.raises(InvalidArgument, match="password is wrong") as info:
        check_ios(bad, now=NOW)
    assert "wrong" not in info.value.message.replace("is wrong", "")


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"days": -1, "start_days_ago": 30}, "expired"),
        ({"start_days_ago": -5}, "not valid before"),
        ({"topics": ["com.other.app"]}, "for com.other.app, not com.acme.shop"),
    ],
)
def test_certificates_that_cannot_push_for_the_app_are_refused(kwargs, problem):
    certificate, key = push_certificate(kwargs.pop("topic", "com.acme.shop"), **kwargs)
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(InvalidArgument, match=problem):
        check_ios(api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pem=pem.decode())), now=NOW)


def test_a_certificate_with_another_apps_subject_is_refused():
    certificate, key = push_certificate("com.other.app")
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(InvalidArgument, match="does not name the topic com.acme.shop"):
        check_ios(api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pem=pem.decode())), now=NOW)


def test_a_key_that_is_not_the_certificates_is_refused():
    certificate, _ = push_certificate("com.acme.shop")
    _, other = push_certificate("com.acme.shop")
    pem = certificate.public_bytes(serialization.Encoding.PEM) + other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(InvalidArgument, match="does not belong to the certificate"):
        check_ios(api.RegisterIosApp(app="com.acme.shop", auth=api.ApnsCertificateAuth(pem=pem.decode())), now=NOW)


def test_the_provider_token_is_es256_with_kid_and_iss_and_renewed_on_apples_schedule():
    key_pem = p8()
    record = check_ios(token_request(key_pem), now=NOW)
    now = [1_800_000_000.0]
    token = ProviderToken(record, clock=lambda: now[0])
    first = token.header()
    assert first.startswith(b"bearer ")
    value = first[7:].decode()
    assert jwt.get_unverified_header(value) == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    public = serialization.load_pem_private_key(key_pem.encode(), None).public_key()
    claims = jwt.decode(value, public, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": TEAM_ID, "iat": 1_800_000_000}
    now[0] += 10 * 60
    assert token.renew_now() is False and token.header() == first  # never twice within 20 minutes
    now[0] += 39 * 60
    assert token.header() == first  # 49 minutes old: still used
    now[0] += 60
    second = token.header()  # 50 minutes: renewed on schedule
    assert second != first and token.renewals == 2
    now[0] += 5 * 60
    assert token.renew_now() is False and token.header() == second
    now[0] += 20 * 60
    assert token.renew_now() is True and token.header() != second and token.renewals == 3
