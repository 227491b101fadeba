"""FCM credentials (plugins/fcm/_credentials.py) and the reading of FCM's answers
(plugins/fcm/_sender.classify), both sans-IO."""

from __future__ import annotations

import json
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plugins.fcm._credentials import GOOGLE_TOKEN_URI, SCOPE, AccessToken, check_android, recheck_android
from plugins.fcm._sender import classify
from protocols import api
from server import InvalidArgument
from server.channels import CredentialsError

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def account(**changes: Any) -> dict[str, Any]:
    doc = {
        "type": "service_account",
        "project_id": "acme-push",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": RSA_PEM,
        "client_email": "pigeon@acme-push.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": GOOGLE_TOKEN_URI,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def register(**changes: Any) -> api.RegisterAndroidApp:
    return api.RegisterAndroidApp(app="com.acme.app", service_account=account(**changes))


def test_a_service_account_is_checked_and_stored_without_echoing_the_key() -> None:
    record = check_android(register())
    assert (record.package_name, record.project_id, record.client_email) == (
        "com.acme.app", "acme-push", "pigeon@acme-push.iam.gserviceaccount.com",
    )
    assert record.token_uri == GOOGLE_TOKEN_URI
    assert record.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    info = record.info()
    assert "private_key_pem" not in info.__struct_fields__
    assert RSA_PEM.splitlines()[1] not in msgspec.json.encode(info).decode()
    assert check_android(register(token_uri=None)).token_uri == GOOGLE_TOKEN_URI
    named = check_android(api.RegisterAndroidApp(app="acme", package_name="com.acme.android", service_account=account()))
    assert named.package_name == "com.acme.android"


EC_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
SMALL_PEM = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"type": "authorized_user"}, "$.service_account.type", "expected 'service_account'"),
        ({"project_id": None}, "$.service_account.project_id", "missing"),
        ({"project_id": ""}, "$.service_account.project_id", "missing"),
        ({"project_id": 42}, "$.service_account.project_id", "expected a string, got int"),
        ({"project_id": "Acme Push"}, "$.service_account.project_id", "not a Firebase project id"),
        ({"client_email": None}, "$.service_account.client_email", "missing"),
        ({"client_email": "pigeon"}, "$.service_account.client_email", "not an e-mail address"),
        ({"private_key_id": None}, "$.service_account.private_key_id", "missing"),
        ({"private_key_id": "a b"}, "$.service_account.private_key_id", "expected the key's id"),
        ({"private_key": None}, "$.service_account.private_key", "missing"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, "$.service_account.private_key",
         "not a PEM private key"),
        ({"private_key": EC_PEM}, "$.service_account.private_key", "an RSA key is needed"),
        ({"private_key": SMALL_PEM}, "$.service_account.private_key", "1024 bits"),
        ({"token_uri": "ftp://x"}, "$.service_account.token_uri", "not an http(s) URL"),
    ],
)
def test_a_bad_service_account_names_the_field_and_never_the_key(changes, field, message) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_android(register(**changes))
    assert caught.value.field == field
    assert message in str(caught.value)
    text = str(caught.value)
    assert "AAAA" not in text and RSA_PEM.splitlines()[1] not in text and EC_PEM.splitlines()[1] not in text


def test_a_token_endpoint_other_than_googles_is_refused_unless_the_setting_names_it() -> None:
    """The server POSTs signed assertions to the token URI: a client's key file must not choose it."""
    for uri in ("http://127.0.0.1:8080/internal-admin?action=delete", "https://oauth2.example.test/token",
                "https://oauth2.googleapis.com.example.test/token"):
        with pytest.raises(InvalidArgument) as caught:
            check_android(register(token_uri=uri))
        assert caught.value.field == "$.service_account.token_uri"
        assert "not Google's token endpoint" in caught.value.message and "fcm.token_uri" in caught.value.message
        with pytest.raises(InvalidArgument):
            check_android(register(token_uri=uri), token_uri_setting="https://127.0.0.1:9/token")
        assert check_android(register(token_uri=uri), token_uri_setting=uri).token_uri == uri
    # Google's endpoints, today's and the one older key files name, with or without the setting
    for uri in (GOOGLE_TOKEN_URI, "https://accounts.google.com/o/oauth2/token"):
        assert check_android(register(token_uri=uri)).token_uri == uri
        assert check_android(register(token_uri=uri), token_uri_setting="https://127.0.0.1:9/token").token_uri == uri


def test_a_stored_account_is_sent_to_no_token_endpoint_but_googles_or_the_settings() -> None:
    """Credentials stored before registration checked the endpoint are checked again before use."""
    record = check_android(register())
    record.token_uri = "http://127.0.0.1:8080/internal-admin"
    with pytest.raises(CredentialsError, match="neither Google's nor the fcm.token_uri setting") as caught:
        AccessToken(record, http=None)  # type: ignore[arg-type]
    assert caught.value.reason == "InvalidCredentials"
    with pytest.raises(CredentialsError):
        AccessToken(record, http=None, token_uri="https://127.0.0.1:9/token")  # type: ignore[arg-type]
    assert AccessToken(record, http=None, token_uri=record.token_uri).token_uri == record.token_uri  # type: ignore[arg-type]
    record.token_uri = GOOGLE_TOKEN_URI
    assert AccessToken(record, http=None).token_uri == GOOGLE_TOKEN_URI  # type: ignore[arg-type]
    # with the setting, a Google account's assertions go where the setting says
    assert AccessToken(record, http=None, token_uri="https://127.0.0.1:9/token").token_uri == "https://127.0.0.1:9/token"  # type: ignore[arg-type]


def test_stored_credentials_are_checked_again_before_use() -> None:
    record = check_android(register())
    recheck_android(record)
    record.private_key_pem = "garbage"
    with pytest.raises(CredentialsError, match="cannot be loaded") as caught:
        recheck_android(record)
    assert caught.value.reason == "InvalidCredentials"


def test_the_assertion_has_googles_claims() -> None:
    record = check_android(register())
    token = AccessToken(record, http=None, clock=lambda: 1_700_000_000.0)  # type: ignore[arg-type]
    assertion = token.assertion(1_700_000_000)
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": record.private_key_id}
    claims = jwt.decode(assertion, RSA_KEY.public_key(), algorithms=["RS256"], audience=record.token_uri,
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {
        "iss": record.client_email, "scope": SCOPE, "aud": record.token_uri,
        "iat": 1_700_000_000, "exp": 1_700_003_600,
    }
    # A token URI from the configuration wins over the account's.
    other = AccessToken(record, http=None, token_uri="https://127.0.0.1:9/token")  # type: ignore[arg-type]
    assert jwt.get_unverified_header(other.assertion(1)) == header
    assert jwt.decode(other.assertion(1), options={"verify_signature": False})["aud"] == "https://127.0.0.1:9/token"


def _error(code: int, status: str, message: str, *details: dict[str, Any]) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return json.dumps({"error": error}).encode()


def fcm_error(code: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}


def bad_request(field: str, description: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field, "description": description}]}


@pytest.mark.parametrize(
    ("status", "headers", "body", "action", "reason"),
    [
        (200, {}, b'{"name": "projects/p/messages/0:1%ab"}', "sent", None),
        (404, {}, _error(404, "NOT_FOUND", "Requested entity was not found.", fcm_error("UNREGISTERED")), "invalid", "UNREGISTERED"),
        (403, {}, _error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm_error("SENDER_ID_MISMATCH")), "invalid",
         "SENDER_ID_MISMATCH"),
        # BadRequest before FcmError: found by @type, whatever the order.
        (400, {}, _error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.",
                         bad_request("message.token", "Invalid registration token"), fcm_error("INVALID_ARGUMENT")),
         "invalid", "INVALID_ARGUMENT"),
        (400, {}, _error(400, "INVALID_ARGUMENT", "bad ttl", fcm_error("INVALID_ARGUMENT"),
                         bad_request("message.android.ttl", "Invalid duration")), "fail", "INVALID_ARGUMENT"),
        (400, {}, _error(400, "INVALID_ARGUMENT", "Request contains an invalid argument."), "fail", "INVALID_ARGUMENT"),
        (429, {b"retry-after": b"7"}, _error(429, "RESOURCE_EXHAUSTED", "quota", fcm_error("QUOTA_EXCEEDED")), "retry",
         "QUOTA_EXCEEDED"),
        (503, {}, _error(503, "UNAVAILABLE", "busy", fcm_error("UNAVAILABLE")), "retry", "UNAVAILABLE"),
        (500, {}, _error(500, "INTERNAL", "Internal error encountered.", fcm_error("INTERNAL")), "retry", "INTERNAL"),
        (502, {}, b"<html><body>Bad Gateway</body></html>", "retry", "HTTP502"),
        (401, {}, _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), "renew", "UNAUTHENTICATED"),
        (403, {}, _error(403, "PERMISSION_DENIED", "Permission denied."), "refuse", "PERMISSION_DENIED"),
        (401, {}, _error(401, "UNAUTHENTICATED", "Auth error from APNS", fcm_error("THIRD_PARTY_AUTH_ERROR")), "fail",
         "THIRD_PARTY_AUTH_ERROR"),
        (401, {}, _error(401, "UNAUTHENTICATED", "old", fcm_error("APNS_AUTH_ERROR")), "fail", "THIRD_PARTY_AUTH_ERROR"),
        (418, {}, b"", "fail", "HTTP418"),
        # Observed without an FcmError detail.
        (403, {}, _error(403, "PERMISSION_DENIED", "SenderId mismatch"), "invalid", "SENDER_ID_MISMATCH"),
        # Google's own sample: no BadRequest detail, the message says it.
        (400, {}, _error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                         fcm_error("INVALID_ARGUMENT")), "invalid", "INVALID_ARGUMENT"),
        (400, {}, b'{"error": "not a map"}', "fail", "HTTP400"),
    ],
)
def test_answers_are_read_by_fcms_error_code(status, headers, body, action, reason) -> None:
    answer = classify(status, headers, body, now=0.0)
    assert (answer.action, answer.reason) == (action, reason)
    if action == "sent":
        assert answer.name == "projects/p/messages/0:1%ab"


def test_retry_after_in_seconds_or_as_a_date() -> None:
    body = _error(503, "UNAVAILABLE", "busy", fcm_error("UNAVAILABLE"))
    assert classify(503, {b"retry-after": b"30"}, body, now=0.0).retry_after == 30.0
    dated = classify(503, {b"retry-after": b"Wed, 21 Oct 2015 07:28:10 GMT"}, body, now=1445412480.0)
    assert dated.retry_after == 10.0
    assert classify(503, {b"retry-after": b"soon"}, body, now=0.0).retry_after is None
    assert classify(503, {b"retry-after": "²".encode("latin-1")}, body, now=0.0).retry_after is None


def test_the_ttl_of_a_raw_message() -> None:
    from plugins.fcm import raw_ttl

    assert raw_ttl({"android": {"ttl": "3600s"}}) == 3600
    assert raw_ttl({"android": {"ttl": "0.5s"}}) == 0
    assert raw_ttl({"android": {"ttl": "0s"}}) == 0
    assert raw_ttl({"android": {"ttl": "soon"}}) is None
    assert raw_ttl({"data": {}}) is None


def test_field_violations_are_in_the_detail() -> None:
    body = _error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.",
                  fcm_error("INVALID_ARGUMENT"), bad_request("message.token", "Invalid registration token"))
    assert classify(400, {}, body).detail == "Request contains an invalid argument.; message.token: Invalid registration token"
