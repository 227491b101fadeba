"""The FCM channel: Firebase Cloud Messaging's HTTP v1 API, as a built-in Pigeon plugin.

It delivers to registrations of platform ``fcm`` with one `FcmSender` (a connection pool, an
OAuth2 access token, a rate limit, retries) per Firebase project and service account, shared
by every app registered with that account. Messages are built by `_message`, credentials
checked by `_credentials`; the mock FCM used by the tests and benchmarks is
`plugins.fcm.mock`.

It is registered through the same hook any channel plugin uses (`pigeon_channels`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from protocols import api
from server.channels import AndroidRecord, AppVersions, Channel, CredentialsError, DeliveryJob, DeliveryResult, Rendered
from server.delivery.breaker import CircuitBreaker
from server.delivery.sender import Collected, Mapped, Progress, Senders
from server.hookspecs import hookimpl
from server.runtime.config import Config, FcmSettings

from ._credentials import check_android, recheck_android, ssl_context
from ._message import PayloadError, build_message, encode_send
from ._sender import FcmSender

__all__ = ["FcmChannel", "pigeon_channels"]

log = logging.getLogger("pigeon.fcm")

#: A sender's key: project, client e-mail, private key id and a digest of the key.
SenderKey = tuple[str, str, str, str]


def sender_key(record: AndroidRecord) -> SenderKey:
    digest = hashlib.sha256(record.private_key_pem.encode()).hexdigest()[:16]
    return (record.project_id, record.client_email, record.private_key_id, digest)


class FcmChannel(Channel):
    """Delivers to FCM; see the module docstring.

    Args:
        settings: the ``[fcm]`` configuration (endpoint, token URI, CA file, pool sizes, rate).
    """

    name: ClassVar[str] = "fcm"
    platforms: ClassVar[frozenset[str]] = frozenset({"fcm"})
    #: The app platform whose credentials this channel checks.
    app_platform: ClassVar[str] = "android"

    def __init__(self, settings: FcmSettings) -> None:
        self.settings = settings
        url = urlsplit(settings.url)
        self.host = url.hostname or ""
        self.port = url.port or 443
        self._senders: Senders[SenderKey, FcmSender] = Senders("the FCM sender")
        #: The apps using each sender (a sender retires when none does).
        self._users: dict[SenderKey, set[str]] = {}
        self._versions = AppVersions()
        self._http: httpx.AsyncClient | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(verify=ssl_context(self.settings.ca_file), timeout=10.0) as http:
            self._http = http
            await self._senders.run(task_status=task_status)

    def check_app(self, request: api.RegisterAndroidApp) -> AndroidRecord:
        """Check Android credentials when an app is registered (raises `InvalidArgument`)."""
        return check_android(request, token_uri_setting=self.settings.token_uri)

    async def send(self, jobs: list[DeliveryJob]) -> list[DeliveryResult]:
        collected = Collected(len(jobs))
        await self.send_each(jobs, collected)
        return collected.results()

    async def send_each(self, jobs: list[DeliveryJob], progress: Progress) -> None:
        """`send`, telling ``progress`` each result as soon as it is known, and how many wait
        for a retry (`server.delivery.sender.Progress`)."""
        groups: dict[SenderKey, tuple[AndroidRecord, list[int], list[bytes], list[int | None]]] = {}
        for index, job in enumerate(jobs):
            android = job.app.android
            if self._versions.stale(job.app):
                progress.result(index, self._versions.result(job.app))
                continue
            if android is None:
                progress.result(index, DeliveryResult(status="failed", reason="NoCredentials", attempts=0,
                                                detail=f"app {job.app.handle} has no Android credentials"))
                continue
            if job.content is None and job.fcm_raw is None:
                progress.result(index, DeliveryResult(status="failed", reason="NoPayloadForPlatform", attempts=0,
                                                detail="the request has a raw APNs payload but no content or fcm_raw"))
                continue
            try:
                message = build_message(content=job.content, raw=job.fcm_raw, options=job.fcm, tracking=job.tracking)
            except PayloadError as exc:
                progress.result(index, DeliveryResult(status="failed", reason=exc.reason, attempts=0, detail=str(exc)))
                continue
            key = sender_key(android)
            self._users.setdefault(key, set()).add(job.app.handle)
            group = groups.setdefault(key, (android, [], [], []))
            group[1].append(index)
            group[2].append(encode_send(message, job.token))
            group[3].append(job.fcm.ttl_s if job.fcm_raw is None else raw_ttl(job.fcm_raw))
        async with trio.open_nursery() as nursery:
            for key, group in groups.items():
                nursery.start_soon(self._send_group, key, group, progress)

    async def _send_group(
        self, key: SenderKey, group: tuple[AndroidRecord, list[int], list[bytes], list[int | None]], progress: Progress
    ) -> None:
        record, indexes, bodies, ttls = group
        try:
            sender = await self._sender(key, record)
        except CredentialsError as exc:
            for index in indexes:
                progress.result(index, DeliveryResult(status="failed", reason=exc.reason, attempts=0, detail=str(exc)))
            return
        await sender.send(bodies, ttls, Mapped(progress, indexes))

    async def _sender(self, key: SenderKey, record: AndroidRecord) -> FcmSender:
        def make() -> FcmSender:
            recheck_android(record)
            settings = self.settings
            assert self._http is not None, "run the channel first"
            return FcmSender(
                record,
                host=self.host,
                port=self.port,
                http=self._http,
                token_uri=settings.token_uri,
                ca_file=settings.ca_file,
                max_connections=settings.max_connections,
                streams_per_connection=settings.streams_per_connection,
                max_queue=settings.max_queue,
                rate_per_minute=settings.rate_per_minute,
                backoff_min=settings.retry_min_s,
                request_timeout=settings.request_timeout_s,
                breaker=CircuitBreaker.from_settings(settings),
            )

        return await self._senders.get(key, make)

    def render(self, job: DeliveryJob) -> Rendered:
        if job.app.android is None:
            return Rendered(error="NoCredentials", detail=f"app {job.app.handle} has no Android credentials")
        try:
            message = build_message(content=job.content, raw=job.fcm_raw, options=job.fcm, tracking=job.tracking)
        except PayloadError as exc:
            return Rendered(error=exc.reason, detail=str(exc))
        return Rendered(payload=message, size=len(msgspec.json.encode(message)))

    def forget_app(self, app: str, version: int | None = None) -> None:
        self._versions.forget(app, version)
        for key, users in list(self._users.items()):
            users.discard(app)
            if not users:
                del self._users[key]
                self._senders.retire([key])

    def statistics(self) -> dict[str, Any]:
        return {f"{project} {email}": s.statistics() for (project, email, _, _), s in self._senders.running.items()}


def raw_ttl(message: dict[str, Any]) -> int | None:
    """The TTL of a raw FCM message (``android.ttl``, ``"3600s"``), in whole seconds."""
    android = message.get("android")
    ttl = android.get("ttl") if isinstance(android, dict) else None
    if isinstance(ttl, str) and ttl.endswith("s"):
        try:
            return max(0, int(float(ttl[:-1])))
        except ValueError:
            return None
    return None


@hookimpl
def pigeon_channels(config: Config) -> list[Channel]:
    return [FcmChannel(config.fcm)]
