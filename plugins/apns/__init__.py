"""The APNs channel: Apple's HTTP/2 provider API, as a built-in Pigeon plugin.

It delivers to registrations of platform ``apns`` (production) and ``apns-sandbox``, with one
`ApnsSender` (a connection pool, a provider token, retries) per app, credentials version and
environment. Payloads are built by `_payload`, credentials checked by `_credentials`; the
mock APNs used by the tests and benchmarks is `plugins.apns.mock`.

It is registered through the same hook any channel plugin uses (`pigeon_channels`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, cast

import trio

from protocols import api
from server.channels import AppRecord, AppVersions, Channel, DeliveryJob, DeliveryResult, IosRecord, Rendered
from server.delivery.breaker import CircuitBreaker
from server.delivery.sender import Collected, Mapped, Progress, Senders
from server.hookspecs import hookimpl
from server.runtime.config import Config, ApnsSettings

from ._credentials import CredentialsError, check_ios, recheck_ios
from ._payload import ApnsRequest, PayloadError, build_request
from ._sender import ApnsSender

__all__ = ["ApnsChannel", "pigeon_channels"]

log = logging.getLogger("pigeon.apns")


class ApnsChannel(Channel):
    """Delivers to APNs; see the module docstring.

    Args:
        settings: the ``[apns]`` configuration (endpoints, CA file, pool sizes).
    """

    name: ClassVar[str] = "apns"
    platforms: ClassVar[frozenset[str]] = frozenset({"apns", "apns-sandbox"})
    #: The app platform whose credentials this channel checks.
    app_platform: ClassVar[str] = "ios"

    def __init__(self, settings: ApnsSettings) -> None:
        self.settings = settings
        self._senders: Senders[tuple[str, int, str], ApnsSender] = Senders("the APNs sender")
        self._versions = AppVersions()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._senders.run(task_status=task_status)

    def check_app(self, request: api.RegisterIosApp) -> IosRecord:
        """Check iOS credentials when an app is registered (raises `InvalidArgument`)."""
        return check_ios(request)

    async def send(self, jobs: list[DeliveryJob]) -> list[DeliveryResult]:
        collected = Collected(len(jobs))
        await self.send_each(jobs, collected)
        return collected.results()

    async def send_each(self, jobs: list[DeliveryJob], progress: Progress) -> None:
        """`send`, telling ``progress`` each result as soon as it is known, and how many wait
        for a retry (`server.delivery.sender.Progress`)."""
        groups: dict[tuple[str, int, str], list[tuple[int, ApnsRequest, str]]] = {}
        apps: dict[tuple[str, int, str], AppRecord] = {}
        for index, job in enumerate(jobs):
            ios = job.app.ios
            if self._versions.stale(job.app):
                progress.result(index, self._versions.result(job.app))
                continue
            if ios is None:
                progress.result(index, DeliveryResult(status="failed", reason="NoCredentials", attempts=0,
                                                detail=f"app {job.app.handle} has no iOS credentials"))
                continue
            environment = "production" if job.platform == "apns" else "sandbox"
            if ios.environment not in (environment, "both"):
                progress.result(index, DeliveryResult(status="failed", reason="EnvironmentNotEnabled", attempts=0,
                                                detail=f"app {job.app.handle} is registered for {ios.environment} only"))
                continue
            if job.content is None and job.raw is None:
                progress.result(index, DeliveryResult(status="failed", reason="NoPayloadForPlatform", attempts=0,
                                                detail="the request has an FCM message (fcm_raw) but no content or raw APNs payload"))
                continue
            try:
                request = build_request(
                    bundle_id=ios.bundle_id, options=job.apns, content=job.content, raw=job.raw, tracking=job.tracking
                )
            except PayloadError as exc:
                progress.result(index, DeliveryResult(status="failed", reason=exc.reason, attempts=0, detail=exc.message))
                continue
            key = (job.app.handle, job.app.version, environment)
            groups.setdefault(key, []).append((index, request, job.token))
            apps[key] = job.app
        async with trio.open_nursery() as nursery:
            for key, items in groups.items():
                nursery.start_soon(self._send_group, key, apps[key], items, progress)

    async def _send_group(
        self, key: tuple[str, int, str], app: AppRecord, items: list[tuple[int, ApnsRequest, str]], progress: Progress
    ) -> None:
        try:
            sender = await self._sender(key, app)
        except CredentialsError as exc:
            for index, _, _ in items:
                progress.result(index, DeliveryResult(status="failed", reason=exc.reason, attempts=0, detail=str(exc)))
            return
        await sender.send([(request, token) for _, request, token in items], Mapped(progress, [i for i, _, _ in items]))

    async def _sender(self, key: tuple[str, int, str], app: AppRecord) -> ApnsSender:
        def make() -> ApnsSender:
            assert app.ios is not None
            recheck_ios(app.ios)  # it may have expired since it was registered
            settings = self.settings
            endpoint = settings.production if key[2] == "production" else settings.sandbox
            host, port = _endpoint(endpoint.address)
            sender = ApnsSender(
                app,
                key[2],
                host=host,
                port=port,
                ca_file=endpoint.ca_file,
                max_connections=settings.max_connections,
                streams_per_connection=settings.streams_per_connection,
                max_queue=settings.max_queue,
                request_timeout=settings.request_timeout_s,
                breaker=CircuitBreaker.from_settings(settings),
            )
            # Credentials of an earlier version of this app are retired.
            self._senders.retire(k for k in self._senders.running if k[0] == key[0] and k[2] == key[2] and k[1] < key[1])
            return sender

        return await self._senders.get(key, make)

    def render(self, job: DeliveryJob) -> Rendered:
        ios = job.app.ios
        if ios is None:
            return Rendered(error="NoCredentials", detail=f"app {job.app.handle} has no iOS credentials")
        try:
            request = build_request(bundle_id=ios.bundle_id, options=job.apns, content=job.content, raw=job.raw,
                                    tracking=job.tracking)
        except PayloadError as exc:
            return Rendered(error=exc.reason, detail=exc.message)
        return Rendered(
            payload=json.loads(request.payload),
            headers={name.decode(): value.decode() for name, value in request.headers},
            size=len(request.payload),
        )

    def forget_app(self, app: str, version: int | None = None) -> None:
        self._versions.forget(app, version)
        self._senders.retire(k for k in self._senders.running if k[0] == app and (version is None or k[1] < version))

    def statistics(self) -> dict[str, Any]:
        return {f"{app} v{version} {env}": s.statistics() for (app, version, env), s in self._senders.running.items()}


def _endpoint(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@hookimpl
def pigeon_channels(config: Config) -> list[Channel]:
    return [ApnsChannel(config.apns)]
