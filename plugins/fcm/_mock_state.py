"""The mock FCM's state (`plugins.fcm.mock`): its faults and switches, its projects (service
accounts, registration tokens, send quotas), what it accepted, its counters, and the admin API
over them (`App`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from plugins._mock_app import AdminRoutes, MockApp, MockFaults
from plugins._mock_tls import locked, public_key_from_pem, write_atomic
from plugins.fcm._mock_schema import TARGETS

if TYPE_CHECKING:
    from plugins.fcm._mock_api import Reply
    from plugins.fcm._mock_http import Connection

__all__ = ["DEFAULT_FAULTS", "Accepted", "Account", "App", "Project", "TokenInfo", "is_number", "token_secret"]

DEFAULT_FAULTS: dict[str, Any] = {
    "accept_any_token": False,
    "quota_per_minute": None,
    "retry_after_s": 60,
    "ratio_503": 0.0,
    "retry_after_s_503": None,
    "ratio_500": 0.0,
    "ratio_502_html": 0.0,
    "seed": 0,
    "latency_ms": 0,
    "token_lifetime_s": 3599,
    "revoke_tokens_before": None,
    "record_accepted": True,
    "max_concurrent_streams": 100,
    "goaway_after_streams": None,
    "goaway_reason": "",
    "reset_after_streams": None,
    "stall": False,
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")



class _Faults(MockFaults):
    """The fault/switch values, as attributes for the request path."""

    __slots__ = tuple(DEFAULT_FAULTS)
    defaults = DEFAULT_FAULTS

    quota_per_minute: int | None
    retry_after_s: int | None
    ratio_503: float
    retry_after_s_503: int | None
    ratio_500: float
    ratio_502_html: float
    token_lifetime_s: int
    revoke_tokens_before: float | None
    goaway_after_streams: int | None
    goaway_reason: str
    reset_after_streams: int | None
    stall: bool


def is_number(value: Any) -> bool:
    return type(value) in (int, float)


_FAULT_CHECKS: dict[str, Any] = {
    "accept_any_token": lambda v: isinstance(v, bool),
    "quota_per_minute": lambda v: v is None or (type(v) is int and v >= 0),
    "retry_after_s": lambda v: v is None or (type(v) is int and v >= 0),
    "ratio_503": lambda v: is_number(v) and 0.0 <= v <= 1.0,
    "retry_after_s_503": lambda v: v is None or (type(v) is int and v >= 0),
    "ratio_500": lambda v: is_number(v) and 0.0 <= v <= 1.0,
    "ratio_502_html": lambda v: is_number(v) and 0.0 <= v <= 1.0,
    "seed": lambda v: type(v) is int,
    "latency_ms": lambda v: is_number(v) and v >= 0,
    "token_lifetime_s": lambda v: type(v) is int and v >= 1,
    "revoke_tokens_before": lambda v: v is None or is_number(v),
    "record_accepted": lambda v: isinstance(v, bool),
    "max_concurrent_streams": lambda v: type(v) is int and v >= 1,
    "goaway_after_streams": lambda v: v is None or (type(v) is int and v >= 0),
    "goaway_reason": lambda v: isinstance(v, str) and v.isascii() and len(v) <= 256,
    "reset_after_streams": lambda v: v is None or (type(v) is int and v >= 0),
    "stall": lambda v: isinstance(v, bool),
}


def _check_faults(update: Any, current: _Faults) -> None:
    """Validate a faults update; raise ValueError/TypeError naming the first bad entry."""
    if not isinstance(update, dict):
        raise TypeError("faults must be a JSON object")
    for name, value in update.items():
        check = _FAULT_CHECKS.get(name)
        if check is None:
            raise ValueError(f"unknown fault {name!r}")
        if not check(value):
            raise ValueError(f"bad value for fault {name!r}: {value!r}")
    ratios = sum(update.get(name, getattr(current, name)) for name in ("ratio_503", "ratio_500", "ratio_502_html"))
    if ratios > 1.0:
        raise ValueError("ratio_503 + ratio_500 + ratio_502_html must not exceed 1")


@dataclass(frozen=True, slots=True)
class Account:
    client_email: str
    private_key_id: str
    public_key: rsa.RSAPublicKey

    def to_json(self) -> dict[str, Any]:
        pem = self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"client_email": self.client_email, "private_key_id": self.private_key_id, "public_key_pem": pem.decode()}


def _parse_account(spec: Any) -> Account:
    if not isinstance(spec, dict):
        raise TypeError("a service account must be a JSON object")
    email, kid, pem = spec.get("client_email"), spec.get("private_key_id"), spec.get("public_key_pem")
    if not (isinstance(email, str) and _NAME_RE.fullmatch(email) and isinstance(kid, str) and kid and isinstance(pem, str)):
        raise ValueError("a service account needs client_email, private_key_id and public_key_pem strings")
    unknown = set(spec) - {"client_email", "private_key_id", "public_key_pem"}
    if unknown:
        raise ValueError(f"service account {email}: unknown fields {sorted(unknown)}")
    try:
        public = public_key_from_pem(pem)
    except ValueError as exc:
        raise ValueError(f"service account {email}: public_key_pem is not a PEM key") from exc
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError(f"service account {email}: not an RSA key (RS256 needs one)")
    return Account(email, kid, public)


def _parse_token_specs(doc: Any) -> dict[str, bool | None]:
    """``{token: {"unregistered": bool} | null}`` -> ``{token: unregistered | None (remove)}``."""
    if not isinstance(doc, dict):
        raise TypeError("tokens must be a JSON object {token: {'unregistered': bool} | null}")
    out: dict[str, bool | None] = {}
    for token, spec in doc.items():
        if not token or not token.isprintable() or " " in token:
            raise ValueError(f"token {token!r} is empty or has spaces or control characters")
        if spec is None:
            out[token] = None
            continue
        if not isinstance(spec, dict) or set(spec) - {"unregistered"}:
            raise ValueError(f"token {token}: spec must be {{'unregistered': bool}} or null")
        unregistered = spec.get("unregistered", False)
        if not isinstance(unregistered, bool):
            raise ValueError(f"token {token}: unregistered must be a boolean")
        out[token] = unregistered
    return out


def _parse_projects(doc: Any) -> dict[str, tuple[list[Account] | None, dict[str, bool | None]]]:
    """``{project: {"service_accounts"?, "tokens"?}}`` -> ``{project: (accounts or None, tokens)}``."""
    if not isinstance(doc, dict):
        raise TypeError("projects must be a JSON object {project_id: {service_accounts, tokens}}")
    out = {}
    for project, spec in doc.items():
        if not _NAME_RE.fullmatch(project):
            raise ValueError(f"bad project id {project!r}")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise TypeError(f"project {project}: must be a JSON object")
        unknown = set(spec) - {"service_accounts", "tokens"}
        if unknown:
            raise ValueError(f"project {project}: unknown fields {sorted(unknown)}")
        accounts = spec.get("service_accounts")
        if accounts is not None:
            if not isinstance(accounts, list):
                raise TypeError(f"project {project}: service_accounts must be a list")
            accounts = [_parse_account(a) for a in accounts]
        out[project] = (accounts, _parse_token_specs(spec.get("tokens") or {}))
    return out


class Project:
    __slots__ = ("id", "accounts", "tokens", "name_prefix", "name_suffix", "quota")

    def __init__(self, project_id: str) -> None:
        self.id = project_id
        self.accounts: list[Account] = []
        self.tokens: dict[str, bool] = {}  # token -> unregistered
        digest = hashlib.sha256(project_id.encode()).hexdigest()[:8]
        self.name_prefix = f"projects/{project_id}/messages/".encode()
        self.name_suffix = f"%{digest}{digest}".encode()
        self.quota = [0.0, 0]  # window start, messages counted

    def to_json(self) -> dict[str, Any]:
        return {
            "service_accounts": [a.to_json() for a in self.accounts],
            "tokens": {token: {"unregistered": gone} for token, gone in self.tokens.items()},
        }


def token_secret(folder: Path) -> bytes:
    """The key of the access tokens' HMAC: ``folder/token-secret``, created once."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token-secret"
    with locked(folder):
        if not path.exists():
            write_atomic(path, secrets.token_hex(32).encode() + b"\n", 0o600)
        return bytes.fromhex(path.read_text().strip())



#: An accepted message: project, target kind, message, name, client_email, protocol,
#: connection, received_at_ns (`App.accepted_local`).
Accepted = tuple[str, str, dict[str, Any], str, str, str, int, int]
#: An access token's contents: (project, client_email, issued_ms, expires_ms).
TokenInfo = tuple[str, str, int, int]


class App(MockApp["Connection"]):
    """Everything one process serves: state, counters, connections, faults.

    ``audiences`` are the ``aud`` values the token endpoint accepts; ``secret`` keys the
    access tokens' HMAC (`token_secret`).
    """

    faults_class = _Faults
    f: _Faults
    accepted: list[Accepted]

    def __init__(self, secret: bytes, audiences: Iterable[str], *, worker: int = 0, workers: int = 1) -> None:
        super().__init__(worker=worker, workers=workers)
        self.secret = secret
        self.audiences = frozenset(audiences)
        self.projects: dict[str, Project] = {}
        self.accounts: dict[str, tuple[str, dict[str, Account]]] = {}  # email -> (project, kid -> account)
        self.token_cache: dict[bytes, TokenInfo | None] = {}
        self.id_base = f"0:{time.time_ns() // 1000}{worker:02d}"
        self.seq = 0
        #: Answers held while ``stall`` is on: (connection, its HTTP/2 stream or None, reply).
        self.stalled: list[tuple[Connection, int | None, Reply]] = []

    # -- counters

    def clear_stats(self) -> None:
        super().clear_stats()
        self.n_requests = 0
        self.n_successes = 0
        self.n_validate_only = 0
        self.errors: dict[str, int] = {}
        self.n_grants = 0
        self.token_errors: dict[str, int] = {}
        self.protocols = {"h2": {"connections": 0, "requests": 0}, "http/1.1": {"connections": 0, "requests": 0}}
        self.n_goaways = 0
        self.n_resets = 0
        self.n_refused = 0

    def stats_local(self) -> dict[str, Any]:
        return {
            "requests": self.n_requests,
            "successes": self.n_successes,
            "validate_only": self.n_validate_only,
            "errors": dict(self.errors),
            "token_grants": self.n_grants,
            "token_errors": dict(self.token_errors),
            "connections_opened": self.n_conns_opened,
            "connections_open": len(self.conns),
            "protocols": {name: dict(counts) for name, counts in self.protocols.items()},
            "goaways_sent": self.n_goaways,
            "resets": self.n_resets,
            "refused_streams": self.n_refused,
            "stalled": len(self.stalled),
        }

    # -- state

    def load(self, doc: Any) -> None:
        """Apply a config document (the --config file)."""
        if not isinstance(doc, dict):
            raise TypeError("the config must be a JSON object")
        unknown = set(doc) - {"projects", "faults"}
        if unknown:
            raise ValueError(f"unknown config entries {sorted(unknown)}")
        for cmd in ({"op": "projects", "body": doc.get("projects") or {}}, {"op": "faults", "body": doc.get("faults") or {}}):
            self.check(cmd)
            self.apply(cmd)

    def _account_index(self, update: dict[str, Any]) -> dict[str, tuple[str, dict[str, Account]]]:
        """The client_email index after ``update`` (parsed projects); a client_email may
        belong to one project only."""
        lists = {pid: p.accounts for pid, p in self.projects.items()}
        for pid, (accounts, _) in update.items():
            if accounts is not None:
                lists[pid] = accounts
        index: dict[str, tuple[str, dict[str, Account]]] = {}
        for pid, accounts in lists.items():
            for account in accounts:
                owner, keys = index.setdefault(account.client_email, (pid, {}))
                if owner != pid:
                    raise ValueError(f"service account {account.client_email} already belongs to project {owner}")
                keys[account.private_key_id] = account
        return index

    def _tokens_update(self, body: Any) -> tuple[str, dict[str, bool | None]]:
        if not isinstance(body, dict) or set(body) != {"project", "tokens"}:
            raise ValueError('tokens updates look like {"project": P, "tokens": {token: {"unregistered": bool} | null}}')
        project = body["project"]
        if not isinstance(project, str) or not _NAME_RE.fullmatch(project):
            raise ValueError(f"bad project id {project!r}")
        return project, _parse_token_specs(body["tokens"])

    def check(self, cmd: dict[str, Any]) -> None:
        """Validate a change before it is applied anywhere (raises ValueError or TypeError)."""
        op, body = cmd["op"], cmd.get("body")
        if op == "projects":
            self._account_index(_parse_projects(body))
        elif op == "tokens":
            self._tokens_update(body)
        elif op == "tokens_clear":
            if body is not None and not (isinstance(body, dict) and set(body) == {"project"} and isinstance(body["project"], str)):
                raise ValueError('clearing tokens takes no body or {"project": P}')
        elif op == "faults":
            _check_faults(body, self.f)

    def _project(self, project_id: str) -> Project:
        project = self.projects.get(project_id)
        if project is None:
            project = self.projects[project_id] = Project(project_id)
        return project

    def apply_state(self, op: str, body: Any) -> None:
        if op == "projects":
            update = _parse_projects(body)
            self.accounts = self._account_index(update)
            for pid, (accounts, tokens) in update.items():
                project = self._project(pid)
                if accounts is not None:
                    project.accounts = accounts
                self._merge_tokens(project, tokens)
        elif op == "tokens":
            pid, tokens = self._tokens_update(body)
            self._merge_tokens(self._project(pid), tokens)
        elif op == "tokens_clear":
            for project in self.projects.values():
                if body is None or project.id == body["project"]:
                    project.tokens.clear()
        else:
            super().apply_state(op, body)

    def set_faults(self, update: dict[str, Any]) -> None:
        """A new ``quota_per_minute`` also restarts every project's quota window; ``stall``
        back to false answers the requests held."""
        was_stalled = self.f.stall
        super().set_faults(update)
        if "quota_per_minute" in update:
            for project in self.projects.values():
                project.quota = [0.0, 0]
        if was_stalled and not self.f.stall:
            self.release_stalled()

    def release_stalled(self) -> None:
        held, self.stalled = self.stalled, []
        for conn, ref, reply in held:
            if not conn.closed:
                conn.answer_late(ref, reply)

    @staticmethod
    def _merge_tokens(project: Project, tokens: dict[str, bool | None]) -> None:
        for token, gone in tokens.items():
            if gone is None:
                project.tokens.pop(token, None)
            else:
                project.tokens[token] = gone

    def state_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "projects": {pid: project.to_json() for pid, project in self.projects.items()},
            "faults": self.f.to_json(),
        }

    def accepted_local(self) -> list[dict[str, Any]]:
        out = []
        for project, kind, message, name, email, protocol, conn, t_ns in self.accepted:
            item: dict[str, Any] = {"project": project}
            for target in TARGETS:
                item[target] = message[target] if target == kind else None
            item.update(
                message=message,
                name=name,
                client_email=email,
                protocol=protocol,
                connection=conn,
                worker=self.worker,
                received_at_ns=t_ns,
            )
            out.append(item)
        return out

    def admin_routes(self) -> AdminRoutes:
        return {
            **super().admin_routes(),
            b"/_mock/projects": {b"PUT": lambda doc: self.changed({"op": "projects", "body": doc})},
            b"/_mock/tokens": {
                b"PUT": lambda doc: self.changed({"op": "tokens", "body": doc}),
                b"DELETE": lambda doc: self.changed({"op": "tokens_clear", "body": doc}),
            },
        }
