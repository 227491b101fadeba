"""The mock FCM's two endpoints (`plugins.fcm.mock`): Google's OAuth2 token endpoint and FCM's
``messages:send``, checked in the order the docstring of `plugins.fcm.mock` gives, and the
replies Google's front end and FCM give (`Reply`). `handle` routes a request to them; it does
not mind whether the request came over HTTP/2 or HTTP/1.1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http
import re
import time
import urllib.parse
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from plugins.fcm._mock_schema import REQUEST, TARGETS, Violation, message_error, parse_object
from plugins.fcm._mock_state import App, Project, TokenInfo, is_number

__all__ = [
    "CLOUD_PLATFORM_SCOPE",
    "FCM_SCOPE",
    "GOOGLE_TOKEN_URI",
    "JWT_BEARER",
    "MAX_BODY",
    "REASONS",
    "STATUS_BYTES",
    "Reply",
    "b64url",
    "handle",
]

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: Request bodies are kept up to this size (a send over it is refused as too big).
MAX_BODY = 256 * 1024
_SEND_PATH = re.compile(rb"/v1/projects/([^/?#]+)/messages:send")

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


def _pretty(doc: Any) -> bytes:
    """JSON as Google's APIs write it: two-space indents and a final newline."""
    return msgspec.json.format(_json_encode(doc), indent=2) + b"\n"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(data: str | bytes) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


# --------------------------------------------------------------------------------------------
# Replies

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_JSON = (b"content-type", b"application/json; charset=UTF-8")
_OAUTH_JSON = [
    (b"content-type", b"application/json; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store, max-age=0, must-revalidate"),
    (b"pragma", b"no-cache"),
]
_SEE = "See https://developers.google.com/identity/sign-in/web/devconsole-project."
_MISSING_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie "
    f"or other valid authentication credential. {_SEE}"
)
_INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    f"or other valid authentication credential. {_SEE}"
)
_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
_HTML_502 = (
    b"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
    b"  <title>Error 502 (Server Error)!!1</title>\n"
    b"  <p><b>502.</b> <ins>That\xe2\x80\x99s an error.</ins>\n"
    b"  <p>The server encountered a temporary error and could not complete your request.<p>"
    b"Please try again in 30 seconds.  <ins>That\xe2\x80\x99s all we know.</ins>\n"
)
STATUS_BYTES = {code: str(code).encode() for code in (200, 400, 401, 403, 404, 405, 429, 500, 502, 503)}
REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


class Reply:
    """One HTTP answer; ``key`` is what stats count it under, ``late`` applies ``latency_ms``."""

    __slots__ = ("status", "headers", "body", "key", "late")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, key: str = "", late: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.key = key
        self.late = late


def _google_error(
    code: int,
    status: str,
    message: str,
    *,
    fcm: str | None = None,
    violations: list[Violation] | None = None,
    extra: list[dict[str, Any]] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Reply:
    details: list[dict[str, Any]] = []
    if fcm is not None:
        details.append({"@type": _FCM_ERROR, "errorCode": fcm})
    if violations:
        field_violations = [
            {"field": field, "description": text} if field else {"description": text} for field, text in violations
        ]
        details.append({"@type": _BAD_REQUEST, "fieldViolations": field_violations})
    details.extend(extra or ())
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return Reply(code, [_JSON, *(headers or ())], _pretty({"error": error}), fcm or status, late=True)


def _oauth_error(code: int, error: str, description: str) -> Reply:
    return Reply(code, _OAUTH_JSON, _pretty({"error": error, "error_description": description}), error)


_REPLY_MISSING = _google_error(
    401,
    "UNAUTHENTICATED",
    _MISSING_CREDENTIALS,
    headers=[(b"www-authenticate", b'Bearer realm="https://accounts.google.com/"')],
)
_REPLY_INVALID = _google_error(
    401,
    "UNAUTHENTICATED",
    _INVALID_CREDENTIALS,
    headers=[(b"www-authenticate", b'Bearer realm="https://accounts.google.com/", error="invalid_token"')],
)
_REPLY_UNREGISTERED = _google_error(404, "NOT_FOUND", "Requested entity was not found.", fcm="UNREGISTERED")
_REPLY_MISMATCH = _google_error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm="SENDER_ID_MISMATCH")
_REPLY_TOO_BIG = _google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
_REPLY_500 = _google_error(500, "INTERNAL", "Internal error encountered.", fcm="INTERNAL")
_REPLY_502 = Reply(502, [(b"content-type", b"text/html; charset=UTF-8")], _HTML_502, "BAD_GATEWAY", late=True)
_REPLY_NOT_FOUND = _google_error(404, "NOT_FOUND", "Method not found.")
_INVALID_TOKEN_TEXT = "The registration token is not a valid FCM registration token"


class _Answer(Exception):
    """A request refused on the way: ``reply`` answers it."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


# --------------------------------------------------------------------------------------------
# Routing


def handle(app: App, protocol: str, conn_id: int, method: bytes, path: bytes, auth: bytes | None, body: bytes, size: int) -> Reply:
    """The reply to a (non-admin) request, counted in ``app``'s stats."""
    app.protocols[protocol]["requests"] += 1
    route = path.split(b"?", 1)[0]
    if route == b"/token":
        reply = token_endpoint(app, body) if method == b"POST" else _oauth_error(405, "invalid_request", "POST only")
        if reply.status == 200:
            app.n_grants += 1
        else:
            app.token_errors[reply.key] = app.token_errors.get(reply.key, 0) + 1
        return reply
    app.n_requests += 1
    match = _SEND_PATH.fullmatch(route)
    if match is None or method != b"POST":
        reply = _REPLY_NOT_FOUND
    else:
        reply = send(app, protocol, conn_id, match.group(1).decode(errors="replace"), auth, body, size)
    if reply.status == 200:
        app.n_successes += 1
    else:
        app.errors[reply.key] = app.errors.get(reply.key, 0) + 1
    return reply


# --------------------------------------------------------------------------------------------
# The token endpoint


def token_endpoint(app: App, body: bytes) -> Reply:
    """``POST /token``: a signed assertion of a service account -> an access token."""
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    grant_type = form.get("grant_type", [""])[-1]
    if grant_type != JWT_BEARER:
        return _oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
    assertion = form.get("assertion", [""])[-1]
    if not assertion:
        return _oauth_error(400, "invalid_request", "Missing required parameter: assertion")
    bad_signature = _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
    try:
        h64, c64, s64 = assertion.split(".")
        header = _json_decode(_b64url_decode(h64))
        claims = _json_decode(_b64url_decode(c64))
        signature = _b64url_decode(s64)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        return bad_signature
    if type(header) is not dict or type(claims) is not dict or header.get("alg") != "RS256":
        return bad_signature
    iss: Any = claims.get("iss")
    kid: Any = header.get("kid")
    owner = app.accounts.get(iss) if isinstance(iss, str) else None
    account = owner[1].get(kid) if owner is not None and isinstance(kid, str) else None
    if owner is None or account is None:
        return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
    try:
        account.public_key.verify(signature, f"{h64}.{c64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return bad_signature
    now = time.time()
    iat: Any = claims.get("iat")  # checked next
    exp: Any = claims.get("exp")
    if not (is_number(iat) and is_number(exp)) or iat > now + 60 or exp <= now or exp - iat > 3600 or exp <= iat:
        return _oauth_error(400, "invalid_grant", _SHORT_LIVED)
    if claims.get("aud") not in app.audiences:
        return _oauth_error(
            400, "invalid_grant", f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URI}"
        )
    scope = claims.get("scope")
    if not isinstance(scope, str) or not scope.split():
        return _oauth_error(400, "invalid_scope", "Empty or missing scope not allowed.")
    if not {FCM_SCOPE, CLOUD_PLATFORM_SCOPE} & set(scope.split()):
        return _oauth_error(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    lifetime = app.f.token_lifetime_s
    issued_ms = int(now * 1000)
    token = _mint(app, owner[0], account.client_email, issued_ms, issued_ms + lifetime * 1000)
    return Reply(200, _OAUTH_JSON, _pretty({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}))


def _mint(app: App, project: str, client_email: str, issued_ms: int, expires_ms: int) -> str:
    payload = f"{project}\n{client_email}\n{issued_ms}\n{expires_ms}".encode()
    mac = hmac.new(app.secret, payload, hashlib.sha256).digest()[:18]
    return f"ya29.m.{b64url(payload)}.{b64url(mac)}"


def _verify_access_token(app: App, token: bytes) -> TokenInfo | None:
    """(project, client_email, issued_ms, expires_ms) of one of this mock's tokens, or None;
    cached in ``app.token_cache`` (emptied past 10,000)."""
    if len(app.token_cache) > 10000:
        app.token_cache.clear()
    entry = None
    try:
        prefix, p64, m64 = token.rsplit(b".", 2)
        payload = _b64url_decode(p64)
        if prefix == b"ya29.m" and hmac.compare_digest(
            _b64url_decode(m64), hmac.new(app.secret, payload, hashlib.sha256).digest()[:18]
        ):
            project, email, issued, expires = payload.decode().split("\n")
            entry = (project, email, int(issued), int(expires))
    except (ValueError, binascii.Error):
        entry = None
    app.token_cache[token] = entry
    return entry


# --------------------------------------------------------------------------------------------
# Send


def send(app: App, protocol: str, conn_id: int, project_id: str, auth: bytes | None, body: bytes, size: int) -> Reply:
    """``POST /v1/projects/{project_id}/messages:send``."""
    try:
        email = _authenticate(app, project_id, auth)
        project = app.projects.get(project_id)
        if project is None:  # a token from an earlier run on the same STATE, for a project not loaded now
            project = Project(project_id)
        _take_quota(app, project)
        request = _read_request(body, size)
        message = request.get("message", {})
        kind = _check_message(message)
        _check_registration(app, project, message, kind)
        _draw_fault(app)
    except _Answer as answer:
        return answer.reply
    if request.get("validate_only"):
        app.n_validate_only += 1
        name = project.name_prefix + b"fake_message_id"
    else:
        app.seq += 1
        name = project.name_prefix + b"%s%08d%s" % (app.id_base.encode(), app.seq, project.name_suffix)
        if app.f.record_accepted:
            app.accepted.append((project_id, kind, message, name.decode(), email, protocol, conn_id, time.time_ns()))
    return Reply(200, [_JSON], b'{\n  "name": "%s"\n}\n' % name, late=True)


def _authenticate(app: App, project_id: str, auth: bytes | None) -> str:
    """The access token of ``Authorization: Bearer``; returns its client_email."""
    if auth is None or auth[:7].lower() != b"bearer " or not auth[7:].strip():
        raise _Answer(_REPLY_MISSING)
    token = auth[7:].strip()
    try:
        info = app.token_cache[token]
    except KeyError:
        info = _verify_access_token(app, token)
    if info is None:
        raise _Answer(_REPLY_INVALID)
    owner, email, issued_ms, expires_ms = info
    if expires_ms <= time.time() * 1000:
        raise _Answer(_REPLY_INVALID)
    revoked = app.f.revoke_tokens_before
    if revoked is not None and issued_ms < revoked * 1000:
        raise _Answer(_REPLY_INVALID)
    if owner != project_id:
        raise _Answer(
            _google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' (or it may not exist).",
            )
        )
    return email


def _take_quota(app: App, project: Project) -> None:
    """Count the send in the project's 60 s window; 429 once ``quota_per_minute`` (this
    worker's share) is used up."""
    quota = app.f.quota_per_minute
    if quota is None:
        return
    now = time.time()
    window = project.quota
    if now - window[0] >= 60.0:
        window[0], window[1] = now, 0
    if window[1] >= quota / app.workers:
        raise _Answer(_quota_exceeded(app, project.id))
    window[1] += 1


def _read_request(body: bytes, size: int) -> dict[str, Any]:
    """The body as a SendMessageRequest (proto field names), or 400 INVALID_ARGUMENT."""
    if size > MAX_BODY:
        raise _Answer(_REPLY_TOO_BIG)
    try:
        doc = _json_decode(body) if body.strip() else {}
    except msgspec.DecodeError:
        text = "Invalid JSON payload received. Unexpected token."
        raise _Answer(_google_error(400, "INVALID_ARGUMENT", text, violations=[(None, text)])) from None
    if type(doc) is not dict:
        text = "Invalid JSON payload received. Expected a JSON object."
        raise _Answer(_google_error(400, "INVALID_ARGUMENT", text, violations=[(None, text)]))
    errors: list[Violation] = []
    request = parse_object(doc, REQUEST, "", errors)
    if errors:
        raise _Answer(_google_error(400, "INVALID_ARGUMENT", "\n".join(text for _, text in errors), violations=errors))
    return request


def _check_message(message: dict[str, Any]) -> str:
    """FCM's rules for the message, and its size; returns its target's kind (``token``, ...)."""
    problem = message_error(message)
    if problem is not None:
        raise _Answer(_google_error(400, "INVALID_ARGUMENT", problem[1], fcm="INVALID_ARGUMENT", violations=[problem]))
    kind = next(name for name in TARGETS if message.get(name))
    sized = {k: v for k, v in message.items() if k != kind}
    if len(_json_encode(sized)) > (2048 if kind in ("topic", "condition") else 4096):
        raise _Answer(_REPLY_TOO_BIG)
    return kind


def _check_registration(app: App, project: Project, message: dict[str, Any], kind: str) -> None:
    """A token (or fid) target must be registered for the project (unless ``accept_any_token``)."""
    if kind not in ("token", "fid"):
        return
    target = message[kind]
    gone = project.tokens.get(target)
    if gone:
        raise _Answer(_REPLY_UNREGISTERED)
    if gone is None:
        if any(target in p.tokens for p in app.projects.values() if p is not project):
            raise _Answer(_REPLY_MISMATCH)
        if not app.f.accept_any_token:
            field = f"message.{kind}"
            raise _Answer(
                _google_error(
                    400,
                    "INVALID_ARGUMENT",
                    _INVALID_TOKEN_TEXT,
                    fcm="INVALID_ARGUMENT",
                    violations=[(field, "Invalid registration token")],
                )
            )


def _draw_fault(app: App) -> None:
    """``ratio_503``, ``ratio_500`` and ``ratio_502_html``: one draw for an otherwise good send."""
    f = app.f
    if f.ratio_503 or f.ratio_500 or f.ratio_502_html:
        draw = app.rng.random()
        if draw < f.ratio_503:
            retry = f.retry_after_s_503
            raise _Answer(
                _google_error(
                    503,
                    "UNAVAILABLE",
                    "The service is currently unavailable.",
                    fcm="UNAVAILABLE",
                    headers=None if retry is None else [(b"retry-after", str(retry).encode())],
                )
            )
        if draw < f.ratio_503 + f.ratio_500:
            raise _Answer(_REPLY_500)
        if draw < f.ratio_503 + f.ratio_500 + f.ratio_502_html:
            raise _Answer(_REPLY_502)


def _quota_exceeded(app: App, project_id: str) -> Reply:
    retry = app.f.retry_after_s
    consumer = f"project:{project_id}"
    return _google_error(
        429,
        "RESOURCE_EXHAUSTED",
        f"Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute' "
        f"of service 'fcm.googleapis.com' for consumer '{consumer}'.",
        fcm="QUOTA_EXCEEDED",
        extra=[
            {
                "@type": _QUOTA_FAILURE,
                "violations": [{"subject": consumer, "description": "Send requests per minute"}],
            }
        ],
        headers=None if retry is None else [(b"retry-after", str(retry).encode())],
    )
