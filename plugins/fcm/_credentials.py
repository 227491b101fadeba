"""FCM credentials: a Firebase service account, checked when an app is registered, and the
OAuth2 access token its sends carry.

The service account is the JSON key file Firebase's console downloads. It must name the
project, the client e-mail, the private key id and an RSA private key (PKCS#8 PEM). Its token
URI, where assertions are exchanged, must be Google's (the default) or the one the server's
``fcm.token_uri`` setting names: the key file comes from a client, and the server POSTs signed
assertions to that address, so any other one would make the server call a URL of the client's
choosing. `AccessToken` signs a JWT assertion with the key (RS256, ``kid`` = private key id,
``iss`` = client e-mail, ``scope`` = firebase.messaging, ``aud`` = token URI, one hour) and
exchanges it for an access token (RFC 7523) with httpx.

Error messages name the field and what is wrong; they never quote the key.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protocols import api
from server import InvalidArgument
from server.channels import AndroidRecord, CredentialsError

__all__ = ["check_android", "recheck_android", "token_endpoint", "AccessToken", "GOOGLE_TOKEN_URI", "SCOPE", "ssl_context"]

log = logging.getLogger("pigeon.fcm")

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Google's token endpoints: today's, and the one older key files name (google-auth takes both).
_GOOGLE_TOKEN_URIS = frozenset({GOOGLE_TOKEN_URI, "https://accounts.google.com/o/oauth2/token"})
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_PROJECT = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}\Z|^[0-9]{1,20}\Z")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\Z")
_KEY_ID = re.compile(r"^[0-9A-Za-z_-]{1,128}\Z")


def _text(account: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = account.get(name)
    if value is None or value == "":
        if required:
            raise InvalidArgument(f"$.service_account.{name}: missing (is this a service account key file?)",
                                  field=f"$.service_account.{name}")
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"$.service_account.{name}: expected a string, got {type(value).__name__}",
                              field=f"$.service_account.{name}")
    return value


def _bad(name: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"$.service_account.{name}: {problem}", field=f"$.service_account.{name}")


def _load_key(text: str, name: str = "private_key") -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise _bad(name, "not a PEM private key (-----BEGIN PRIVATE KEY-----), or encrypted") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _bad(name, "an RSA key is needed for RS256 (Google issues RSA 2048-bit keys); this key is not RSA")
    if key.key_size < 2048:
        raise _bad(name, f"the RSA key has {key.key_size} bits; Google issues 2048")
    return key


def token_endpoint(account_uri: str, setting: str | None) -> str | None:
    """Where to exchange the assertions of a service account whose key file names
    ``account_uri``: the ``fcm.token_uri`` setting when there is one, else the account's own
    if it is Google's. None when the account names another endpoint that the setting does
    not: only the server's configuration may send assertions elsewhere."""
    if setting is not None:
        return setting if account_uri in _GOOGLE_TOKEN_URIS or account_uri == setting else None
    return account_uri if account_uri in _GOOGLE_TOKEN_URIS else None


def check_android(
    request: api.RegisterAndroidApp, *, token_uri_setting: str | None = None, now: datetime | None = None
) -> AndroidRecord:
    """Check the service account of ``request`` and return the record to store.

    Args:
        token_uri_setting: the ``fcm.token_uri`` setting: the only token endpoint besides
            Google's that a service account may name.

    Raises:
        InvalidArgument: naming the field and the problem (never the key itself).
    """
    account = request.service_account
    kind = account.get("type")
    if kind is not None and kind != "service_account":
        raise _bad("type", f"expected 'service_account', got {kind!r} (use the service account's key file)")
    project_id = _text(account, "project_id")
    client_email = _text(account, "client_email")
    private_key_id = _text(account, "private_key_id")
    private_key = _text(account, "private_key")
    token_uri = _text(account, "token_uri", required=False) or GOOGLE_TOKEN_URI
    assert project_id and client_email and private_key_id and private_key
    if not _PROJECT.match(project_id):
        raise _bad("project_id", f"{project_id!r} is not a Firebase project id (lower-case letters, digits, '-')")
    if not _EMAIL.match(client_email):
        raise _bad("client_email", f"{client_email!r} is not an e-mail address")
    if not _KEY_ID.match(private_key_id):
        raise _bad("private_key_id", "expected the key's id (letters and digits)")
    if not re.match(r"^https?://\S+\Z", token_uri):
        raise _bad("token_uri", f"{token_uri!r} is not an http(s) URL")
    if token_endpoint(token_uri, token_uri_setting) is None:
        raise _bad(
            "token_uri",
            f"{token_uri!r} is not Google's token endpoint ({GOOGLE_TOKEN_URI}); the server exchanges assertions only"
            " there, or at the endpoint its fcm.token_uri setting names (set it to use another one, such as a mock's)",
        )
    key = _load_key(private_key)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return AndroidRecord(
        package_name=request.package_name or request.app,
        project_id=project_id,
        client_email=client_email,
        private_key_id=private_key_id,
        private_key_pem=pem.decode(),
        token_uri=token_uri,
        updated=now or datetime.now(UTC),
    )


def recheck_android(record: AndroidRecord) -> rsa.RSAPrivateKey:
    """Load stored credentials again before a sender uses them; return the key.

    Raises:
        CredentialsError: naming what is wrong.
    """
    if not (record.project_id and record.client_email and record.private_key_id and record.private_key_pem):
        raise CredentialsError("the app's service account is incomplete; register the app again")
    try:
        return _load_key(record.private_key_pem)
    except InvalidArgument:
        raise CredentialsError("the stored service account key cannot be loaded; register the app again") from None


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS settings for FCM and the token endpoint: the system's trust store, or ``ca_file``."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class AccessToken:
    """A project's OAuth2 access token: exchanged, cached, renewed before it expires.

    `AccessToken.refresh` raises `CredentialsError` with reason ``InvalidCredentials`` when
    the token endpoint refuses the service account (a 4xx: revoked key, unknown client, clock
    skew) and ``TokenEndpointUnavailable`` when it cannot be reached or fails (network, 5xx).

    Args:
        record: the service account.
        token_uri: the ``fcm.token_uri`` setting: exchange assertions there (by default at
            the account's own endpoint, which must be Google's; see `token_endpoint`).
        http: the HTTP client (its TLS settings apply).
        clock: seconds since the epoch.

    Raises:
        CredentialsError: the stored account names a token endpoint that is not allowed
            (stored before registration checked it, or the setting has changed since).
    """

    #: Renew when less than this (or half its life) is left; google-auth renews 3 min 45 s early.
    RENEW_BEFORE = 300.0
    #: Stop using it when less than this (or a tenth of its life) is left.
    USABLE_UNTIL = 30.0
    #: The assertion's lifetime (Google allows at most one hour).
    ASSERTION_LIFETIME = 3600

    def __init__(
        self,
        record: AndroidRecord,
        *,
        http: httpx.AsyncClient,
        token_uri: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = recheck_android(record)
        self.record = record
        endpoint = token_endpoint(record.token_uri, token_uri)
        if endpoint is None:
            raise CredentialsError(
                f"the service account of {record.project_id} names the token endpoint {record.token_uri!r}, which is"
                " neither Google's nor the fcm.token_uri setting; register the app again, or set fcm.token_uri"
            )
        self.token_uri = endpoint
        self.http = http
        self.clock = clock
        #: ``Bearer <token>`` (empty before the first exchange).
        self.header = b""
        self.expires = 0.0
        self.issued = 0.0
        self.renewals = 0

    def usable(self, now: float) -> bool:
        """Whether sends may carry it (not within 30 s, or a tenth of its life, of expiring)."""
        margin = min(self.USABLE_UNTIL, (self.expires - self.issued) / 10)
        return bool(self.header) and now < self.expires - margin

    def due(self, now: float) -> bool:
        """Whether to renew it now (5 minutes, or half its life, before it expires)."""
        return now >= self.expires - min(self.RENEW_BEFORE, (self.expires - self.issued) / 2)

    def invalidate(self, header: bytes) -> None:
        """FCM refused ``header`` (401): the next send renews it, if it is still the current one."""
        if header == self.header:
            self.expires = 0.0

    def assertion(self, now: int) -> str:
        claims = {
            "iss": self.record.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + self.ASSERTION_LIFETIME,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.record.private_key_id})

    async def refresh(self) -> None:
        """Exchange a new assertion for an access token."""
        now = int(self.clock())
        project = self.record.project_id
        try:
            response = await self.http.post(
                self.token_uri,
                data={"grant_type": _GRANT_TYPE, "assertion": self.assertion(now)},
                headers={"accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CredentialsError(
                f"cannot reach the token endpoint {self.token_uri} for {project}: {type(exc).__name__} {exc}".rstrip(),
                "TokenEndpointUnavailable",
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        if response.status_code != 200:
            error = str(body.get("error") or f"HTTP {response.status_code}")
            description = body.get("error_description")
            what = f"{error} ({description})" if isinstance(description, str) and description else error
            if response.status_code >= 500 or response.status_code == 429 or error in ("internal_failure", "server_error", "temporarily_unavailable"):
                raise CredentialsError(f"the token endpoint failed for {project}: {what}", "TokenEndpointUnavailable")
            raise CredentialsError(
                f"the token endpoint refused the service account {self.record.client_email} of {project}: {what}",
                "InvalidCredentials",
            )
        token = body.get("access_token")
        try:
            lifetime = float(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = -1.0
        if not isinstance(token, str) or not token or lifetime <= 0:
            raise CredentialsError(
                f"the token endpoint of {project} answered without a usable access_token/expires_in", "TokenEndpointUnavailable"
            )
        self.header = b"Bearer " + token.encode()
        self.issued = float(now)
        self.expires = now + lifetime
        self.renewals += 1
        log.debug("%s: access token renewed (valid %.0fs)", project, lifetime)
