"""The mock APNs' state (`plugins.apns.mock`): its faults and switches, the device tokens it
knows, the signing keys it trusts, what it accepted, its counters, and the admin API over them
(`App`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from plugins._mock_app import AdminRoutes, MockApp, MockFaults, merge_counts
from plugins.apns._mock_auth import CertInfo, JwtEntry, ProviderKey, parse_keys, read_certificate, verify_jwt

if TYPE_CHECKING:
    from plugins.apns._mock_server import Connection, Response

__all__ = ["DEFAULT_FAULTS", "Accepted", "App", "TokenInfo"]

_json_decode = msgspec.json.decode

DEFAULT_FAULTS: dict[str, Any] = {
    "accept_any_token": False,
    "strict_token_length": True,
    "max_concurrent_streams": 1000,
    "one_stream_until_valid_token": False,
    "goaway_after_streams": None,
    "goaway_reason": "Shutdown",
    "reset_after_streams": None,
    "ratio_429": 0.0,
    "ratio_503": 0.0,
    "seed": 0,
    "latency_ms": 0,
    "stall": False,
    "token_max_age_s": 3600,
    "token_update_interval_s": 1200,
    "record_accepted": True,
    "bad_environment_key_reason": "BadEnvironmentKeyIdInToken",
}


class _Faults(MockFaults):
    """The fault/switch values, as attributes for the request path."""

    __slots__ = tuple(DEFAULT_FAULTS)
    defaults = DEFAULT_FAULTS

    strict_token_length: bool
    one_stream_until_valid_token: bool
    goaway_after_streams: int | None
    goaway_reason: str
    reset_after_streams: int | None
    ratio_429: float
    ratio_503: float
    stall: bool
    token_max_age_s: float
    token_update_interval_s: float
    bad_environment_key_reason: str


def _check_faults(update: Any) -> dict[str, Any]:
    """Validate a faults update; raise ValueError/TypeError naming the first bad entry."""
    if not isinstance(update, dict):
        raise TypeError("faults must be a JSON object")
    for name, value in update.items():
        if name not in DEFAULT_FAULTS:
            raise ValueError(f"unknown fault {name!r}")
        default = DEFAULT_FAULTS[name]
        if name in ("goaway_after_streams", "reset_after_streams"):
            ok = value is None or (type(value) is int and value >= 0)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif name.startswith("ratio_"):
            ok = type(value) in (int, float) and 0.0 <= value <= 1.0
        elif isinstance(default, int):
            ok = type(value) in (int, float) and value >= 0 and (name != "max_concurrent_streams" or value >= 1)
            if name in ("max_concurrent_streams", "seed"):
                ok = ok and type(value) is int
        else:
            ok = isinstance(value, str) and bool(value)
        if not ok:
            raise ValueError(f"bad value for fault {name!r}: {value!r}")
    return update


_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A registered device token: its topics, when it was unregistered (ms), its environment."""

    topics: frozenset[bytes]
    unregistered_at_ms: int | None
    environment: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "topics": sorted(t.decode() for t in self.topics),
            "unregistered_at_ms": self.unregistered_at_ms,
            "environment": self.environment,
        }


def _parse_tokens(doc: Any) -> dict[bytes, TokenInfo | None]:
    if not isinstance(doc, dict):
        raise TypeError("tokens must be a JSON object {token_hex: spec | null}")
    out: dict[bytes, TokenInfo | None] = {}
    for token, spec in doc.items():
        if not _HEX_RE.fullmatch(token):
            raise ValueError(f"token {token!r} is not hex")
        if spec is None:
            out[token.lower().encode()] = None
            continue
        if isinstance(spec, list):
            spec = {"topics": spec}
        if not isinstance(spec, dict):
            raise TypeError(f"token {token}: spec must be an object, a list of topics or null")
        topics = spec.get("topics", [])
        unregistered = spec.get("unregistered_at_ms")
        environment = spec.get("environment")
        if not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
            raise ValueError(f"token {token}: topics must be a list of strings")
        if unregistered is not None and type(unregistered) is not int:
            raise ValueError(f"token {token}: unregistered_at_ms must be an integer or null")
        if environment not in (None, "sandbox", "production"):
            raise ValueError(f"token {token}: environment must be sandbox, production or null")
        unknown = set(spec) - {"topics", "unregistered_at_ms", "environment"}
        if unknown:
            raise ValueError(f"token {token}: unknown fields {sorted(unknown)}")
        out[token.lower().encode()] = TokenInfo(frozenset(t.encode() for t in topics), unregistered, environment)
    return out


#: An accepted notification: token, topic, push_type, priority, expiration, collapse_id,
#: apns_id, payload, connection, stream_id, auth, received_at_ns (`App.accepted_local`).
Accepted = tuple[bytes, bytes, bytes | None, bytes | None, bytes | None, bytes | None, bytes, bytes, int, int, str, int]


class App(MockApp["Connection"]):
    """Everything one process serves: state, counters, connections, faults."""

    faults_class = _Faults
    f: _Faults
    accepted: list[Accepted]

    def __init__(self, environment: str, *, worker: int = 0, workers: int = 1) -> None:
        super().__init__(worker=worker, workers=workers)
        self.environment = environment
        self.sandbox = environment == "sandbox"
        self.keys: dict[str, ProviderKey] = {}
        self.tokens: dict[bytes, TokenInfo] = {}
        self.jwt_cache: dict[bytes, JwtEntry] = {}
        self.cert_cache: dict[bytes, CertInfo] = {}
        self.stalled: list[tuple[Connection, int, Response]] = []

    # -- counters

    def clear_stats(self) -> None:
        super().clear_stats()
        self.n_requests = 0
        self.n_accepted = 0
        self.rejected: dict[str, int] = {}
        self.n_goaways = 0
        self.n_resets = 0
        self.n_refused = 0
        self.closed_max_streams: dict[str, int] = {}
        for conn in self.conns:
            conn.max_open = len(conn.h2.unanswered) if conn.h2 is not None else 0

    def stats_local(self) -> dict[str, Any]:
        per_conn = dict(self.closed_max_streams)
        for conn in self.conns:
            per_conn[str(conn.id)] = conn.max_open
        return {
            "requests": self.n_requests,
            "accepted": self.n_accepted,
            "rejected": dict(self.rejected),
            "connections_opened": self.n_conns_opened,
            "connections_open": len(self.conns),
            "goaways_sent": self.n_goaways,
            "resets": self.n_resets,
            "refused_streams": self.n_refused,
            "stalled": len(self.stalled),
            "max_concurrent_streams": per_conn,
        }

    def merge_stats(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        out = merge_counts(parts)
        per_conn = out.get("max_concurrent_streams", {})
        out["max_concurrent_streams_observed"] = max(per_conn.values(), default=0)
        out["workers"] = len(parts)
        return out

    # -- state

    def load(self, doc: Any) -> None:
        """Apply a config document (the --config file)."""
        if not isinstance(doc, dict):
            raise TypeError("the config must be a JSON object")
        unknown = set(doc) - {"keys", "tokens", "accept_any_token", "faults"}
        if unknown:
            raise ValueError(f"unknown config entries {sorted(unknown)}")
        faults = dict(doc.get("faults") or {})
        if "accept_any_token" in doc:
            faults["accept_any_token"] = doc["accept_any_token"]
        for cmd in (
            {"op": "keys", "body": doc.get("keys", [])},
            {"op": "tokens", "body": doc.get("tokens", {})},
            {"op": "faults", "body": faults},
        ):
            self.check(cmd)
            self.apply(cmd)

    def check(self, cmd: dict[str, Any]) -> None:
        """Validate a change before it is applied anywhere (raises ValueError or TypeError)."""
        op, body = cmd["op"], cmd.get("body")
        if op == "keys":
            parse_keys(body)
        elif op == "tokens":
            _parse_tokens(body)
        elif op == "faults":
            update = _check_faults(body)
            ratio = update.get("ratio_429", self.f.ratio_429) + update.get("ratio_503", self.f.ratio_503)
            if ratio > 1.0:
                raise ValueError("ratio_429 + ratio_503 must not exceed 1")

    def apply_state(self, op: str, body: Any) -> None:
        if op == "keys":
            self.keys = parse_keys(body)
            self.jwt_cache.clear()
        elif op == "tokens":
            for token, info in _parse_tokens(body).items():
                if info is None:
                    self.tokens.pop(token, None)
                else:
                    self.tokens[token] = info
        elif op == "tokens_clear":
            self.tokens.clear()
        else:
            super().apply_state(op, body)

    def set_faults(self, update: dict[str, Any]) -> None:
        """Also answers the stalled requests once ``stall`` goes back to false."""
        was_stalled = self.f.stall
        super().set_faults(update)
        if was_stalled and not self.f.stall:
            self.release_stalled()

    def state_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "workers": self.workers,
            "keys": [key.to_json() for key in self.keys.values()],
            "tokens": {token.decode(): info.to_json() for token, info in self.tokens.items()},
            "accept_any_token": self.f.accept_any_token,
            "faults": self.f.to_json(),
        }

    def accepted_local(self) -> list[dict[str, Any]]:
        out = []
        for token, topic, push_type, priority, expiration, collapse, apns_id, body, conn, sid, auth, t_ns in self.accepted:
            out.append(
                {
                    "token": token.decode(),
                    "topic": topic.decode(errors="replace"),
                    "push_type": None if push_type is None else push_type.decode(errors="replace"),
                    "priority": None if priority is None else int(priority),
                    "expiration": None if expiration is None else int(expiration),
                    "collapse_id": None if collapse is None else collapse.decode(errors="replace"),
                    "apns_id": apns_id.decode(),
                    "payload": _json_decode(body),
                    "connection": conn,
                    "stream_id": sid,
                    "auth": auth,
                    "worker": self.worker,
                    "received_at_ns": t_ns,
                }
            )
        return out

    def admin_routes(self) -> AdminRoutes:
        return {
            **super().admin_routes(),
            b"/_mock/keys": {b"PUT": lambda doc: self.changed({"op": "keys", "body": doc})},
            b"/_mock/tokens": {
                b"PUT": lambda doc: self.changed({"op": "tokens", "body": doc}),
                b"DELETE": lambda doc: self.changed({"op": "tokens_clear"}),
            },
        }

    # -- the request path

    def release_stalled(self) -> None:
        held, self.stalled = self.stalled, []
        touched = set()
        for conn, sid, resp in held:
            if not conn.closed:
                conn.answer(sid, resp)
                touched.add(conn)
        for conn in touched:
            conn.flush()

    def verify_jwt(self, token: bytes) -> JwtEntry:
        """`verify_jwt` with the current keys, cached (``jwt_cache``, emptied past 10,000)."""
        if len(self.jwt_cache) > 10000:
            self.jwt_cache.clear()
        entry = verify_jwt(self.keys, token)
        self.jwt_cache[token] = entry
        return entry

    def cert_info(self, der: bytes) -> CertInfo:
        info = self.cert_cache.get(der)
        if info is None:
            info = self.cert_cache[der] = read_certificate(der)
        return info
