"""Configuration: defaults, then a TOML file, then ``PIGEON_*`` variables, then flags.

The file is ``--config FILE`` (or ``PIGEON_CONFIG``), else ``./pigeon.toml`` when it exists.
Environment variables name a key in upper case, with ``__`` between a section and its key:
``PIGEON_DATA``, ``PIGEON_LISTEN`` (comma-separated), ``PIGEON_STORE__RETENTION_DAYS``.
A wrong value is reported with its key and where it came from; a ``PIGEON_*`` variable that
names no key is ignored with a warning (clients and plugins use the prefix too).
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

from protocols.framing import DEFAULT_MAX_FRAME

from server.runtime.errors import ConfigError

__all__ = ["Config", "StoreSettings", "IngestSettings", "SupervisorSettings", "SenderSettings", "ApnsSettings", "ApnsEndpoint", "FcmSettings", "load_config", "DEFAULT_LISTEN", "DEFAULT_DATA"]

log = logging.getLogger("pigeon.config")

DEFAULT_LISTEN = "127.0.0.1:7600"
DEFAULT_DATA = "./pigeon-data"

Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class StoreSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Initial LMDB map size; it doubles whenever it fills.
    map_size_mb: Positive = 1024
    #: Most write ops in one group commit.
    max_batch: Positive = 1024
    #: Experience events older than this are deleted.
    retention_days: PositiveFloat = 90.0
    #: Push registrations kept per profile: registering one more evicts the least recently
    #: seen (the reply of tokens.register names it). Lowering it trims a profile at its next
    #: registration.
    max_registrations: Positive = 50
    sweep_interval_s: PositiveFloat = 3600.0
    #: fsync every commit; turn off only for throwaway data.
    sync: bool = True


class IngestSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The admission budget of ``events.ingest`` (`server.profiles.budget`): calls admitted and
    not yet committed hold at most this many events and MiB of requests, all connections
    together; past it a call is refused at once with RESOURCE_EXHAUSTED and a retry hint.
    And the window of event ids (`server.profiles.writes.ingest_events_once`)."""

    backlog_events: Positive = 50_000
    backlog_mb: Positive = 32
    #: An event whose client id (``Event.id``) an event of its sandbox stored less than this
    #: many seconds ago is not stored again (a batch sent again after a lost answer); 0 turns
    #: it off (ids are then not remembered, and those remembered are forgotten).
    dedupe_window_s: Annotated[float, msgspec.Meta(ge=0)] = 86_400.0


class SupervisorSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    intensity: Annotated[int, msgspec.Meta(ge=0)] = 5
    period_s: PositiveFloat = 10.0
    backoff_min_s: PositiveFloat = 0.05
    backoff_max_s: PositiveFloat = 5.0


Endpoint = Annotated[str, msgspec.Meta(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}\Z")]


class ApnsEndpoint(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: HOST:PORT of the APNs environment (point it at the mock for tests and benchmarks).
    address: Endpoint
    #: Trust this CA file instead of the system's (the mock writes one).
    ca_file: str | None = None


class SenderSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the APNs and FCM senders share: the request timeout and the circuit breaker of
    each sender (`server.delivery.breaker`)."""

    #: A request not answered within this fails (and is retried).
    request_timeout_s: PositiveFloat = 30.0
    #: The breaker opens after this many failures in a row that say the provider is unwell
    #: (5xx, 429, lost connections, no answer), or this many connections in a row that could
    #: not be opened (nothing listening, TLS refused) ...
    breaker_failures: Positive = 20
    breaker_connect_failures: Positive = 3
    #: ... then fails notifications at once (``CircuitOpen``) for this long, lets one probe
    #: through, and doubles the period each time the probe fails, up to the maximum.
    breaker_cooldown_s: PositiveFloat = 10.0
    breaker_cooldown_max_s: PositiveFloat = 300.0
    #: False: no breaker (retries alone).
    breaker: bool = True


class ApnsSettings(SenderSettings, kw_only=True, forbid_unknown_fields=True):
    production: ApnsEndpoint = msgspec.field(default_factory=lambda: ApnsEndpoint(address="api.push.apple.com:443"))
    sandbox: ApnsEndpoint = msgspec.field(default_factory=lambda: ApnsEndpoint(address="api.sandbox.push.apple.com:443"))
    #: Connections per app and environment, and streams in flight on each.
    max_connections: Positive = 4
    streams_per_connection: Positive = 100
    #: Notifications queued or in flight per app and environment before senders wait.
    max_queue: Positive = 10_000


class FcmSettings(SenderSettings, kw_only=True, forbid_unknown_fields=True):
    #: FCM's base URL: messages go to ``{url}/v1/projects/{project}/messages:send``
    #: (point it at the mock for tests and benchmarks).
    url: Annotated[str, msgspec.Meta(pattern=r"^https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?\Z")] = (
        "https://fcm.googleapis.com"
    )
    #: Exchange OAuth2 assertions here instead of at Google's endpoint. A service account
    #: whose ``token_uri`` is neither Google's nor this one is refused when it is registered
    #: (the server would POST signed assertions to an address a client chose).
    token_uri: Annotated[str, msgspec.Meta(pattern=r"^https?://\S+\Z")] | None = None
    #: Trust this CA file instead of the system's, for FCM and the token endpoint (the mock writes one).
    ca_file: str | None = None
    #: Connections per Firebase project, and streams in flight on each (FCM allows 100).
    max_connections: Positive = 4
    streams_per_connection: Positive = 100
    #: Messages queued or in flight per project before senders wait.
    max_queue: Positive = 10_000
    #: Messages sent per project per minute at most (FCM's default quota).
    rate_per_minute: Positive = 600_000
    #: First retry delay after 429/500/503 without Retry-After (Google asks for at least 10 s).
    retry_min_s: PositiveFloat = 10.0


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    data: str = DEFAULT_DATA
    #: The master key file (`server.runtime.masterkey`): default beside the data folder,
    #: ``<data>.master-key``; ``PIGEON_MASTER_KEY`` holds the key itself instead.
    master_key_file: str | None = None
    listen: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: [DEFAULT_LISTEN])
    #: Serve TLS on TCP addresses with this certificate chain and key (PEM files).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: ``keys``: every connection needs an API key (PROTOCOL.md, section 5.1); ``none``: any
    #: connection may call anything, allowed only on loopback and unix addresses.
    auth: Literal["keys", "none"] = "keys"
    #: The first admin key is written there at the first start: default beside the data
    #: folder, ``<data>.admin-key``; ``PIGEON_ADMIN_KEY`` gives the key itself instead.
    admin_key_file: str | None = None
    #: Listen beyond loopback without TLS (a private network): keys then cross the network in
    #: the clear. Logged as a warning at each start.
    insecure_plaintext_network: bool = False
    #: The longest a refused API key's goaway waits, after repeated failures from its host.
    refusal_delay_max_s: Annotated[float, msgspec.Meta(ge=0)] = 4.0
    max_frame: Annotated[int, msgspec.Meta(ge=1024)] = DEFAULT_MAX_FRAME
    max_calls: Positive = 256
    max_connections: Positive = 1024
    #: Connections from one address (host) at most.
    max_connections_per_peer: Positive = 256
    #: Connections that have not said hello yet at most; past it the oldest of them is closed.
    max_handshakes: Positive = 128
    write_timeout_s: PositiveFloat = 30.0
    #: Seconds a new connection has to send its hello before it is closed ...
    handshake_timeout_s: PositiveFloat = 10.0
    #: ... and while more than half of max_handshakes are taken.
    busy_handshake_timeout_s: PositiveFloat = 1.0
    #: MiB of answers waiting to be written (or reserved for calls running), all connections
    #: together; past it calls wait (a connection with nothing waiting still runs one).
    reply_buffer_mb: Positive = 64
    shutdown_grace_s: PositiveFloat = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    apns: ApnsSettings = msgspec.field(default_factory=ApnsSettings)
    fcm: FcmSettings = msgspec.field(default_factory=FcmSettings)


_LIST_KEYS = {"listen"}


def _is_setting(path: list[str]) -> bool:
    """Whether ``path`` (``["store", "sync"]``) names a configuration key."""
    info: Any = msgspec.inspect.type_info(Config)
    for part in path:
        if not isinstance(info, msgspec.inspect.StructType):
            return False
        field = next((f for f in info.fields if f.name == part), None)
        if field is None:
            return False
        info = field.type
    return True


#: ``PIGEON_*`` variables that are not configuration keys: read where they are used.
_NOT_SETTINGS = frozenset(("PIGEON_CONFIG", "PIGEON_SERVER", "PIGEON_MASTER_KEY", "PIGEON_ADMIN_KEY", "PIGEON_API_KEY"))


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith("PIGEON_") or name in _NOT_SETTINGS:
            continue
        path = name[len("PIGEON_") :].lower().split("__")
        if not _is_setting(path):
            # PIGEON_ is shared with clients and plugins: a variable this server does not
            # know is not an error, but it may be a typo.
            log.warning("ignoring environment variable %s: no such configuration key", name)
            continue
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        key = path[-1]
        target[key] = [item.strip() for item in raw.split(",") if item.strip()] if key in _LIST_KEYS else raw
        sources[".".join(path)] = f"environment variable {name}"
    return values, sources


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


def _paths(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        out.extend(_paths(value, path + ".") if isinstance(value, Mapping) else [path])
    return out


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration; raise `ConfigError` naming the bad key and its source."""
    file_values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = path or env.get("PIGEON_CONFIG")
    if path is None and Path("pigeon.toml").is_file():
        path = "pigeon.toml"
    if path is not None:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the configuration file {path!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the configuration file {path!r} is not valid TOML: {exc}") from None
        sources.update({key: f"{path}" for key in _paths(file_values)})
    env_values, env_sources = _from_env(env)
    sources.update(env_sources)
    flag_values = dict(overrides or {})
    sources.update({key: "the command line" for key in _paths(flag_values)})
    merged = _merge(_merge(file_values, env_values), flag_values)
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = message.rfind(" - at `$")
        path = message[at + 8 : -1].lstrip(".") if at >= 0 else ""
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        if unknown:
            key = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            source = sources.get(key)
            raise ConfigError(f"unknown configuration key {key!r}" + (f" (from {source})" if source else "")) from None
        source = sources.get(path.split("[")[0])
        where = f" (from {source})" if source else ""
        raise ConfigError(f"configuration key {path!r}{where}: {message.split(' - at ')[0]}") from None
