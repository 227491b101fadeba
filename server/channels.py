"""What a delivery channel is: the contract between Pigeon and channel plugins.

A channel (APNs, FCM, a plugin's own) delivers notifications to the push registrations of
one or more platforms. Plugins provide channels through the `pigeon_channels` hook
(`server.hookspecs`); the delivery actor starts each channel's `Channel.run` and hands it
`DeliveryJob` batches. The built-in APNs channel (`plugins.apns`) is written against exactly
this contract.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

import msgspec
import trio

from protocols import api

from server.runtime.errors import ServerError

__all__ = ["Rendered", "AppVersions", "CredentialsError", "IosRecord", "AndroidRecord", "AppRecord", "DeliveryJob", "DeliveryResult", "Channel",
           "json_problem"]

_json_encode = msgspec.json.Encoder().encode


def json_problem(value: Any, path: str) -> tuple[str, str] | None:
    """The path of the first part of ``value`` that JSON cannot hold (as msgspec maps it:
    bytes become base64, a datetime RFC 3339), and why; None when it encodes. Channels use
    it to name the field of a raw payload a client sent (``$.raw.data.k``) instead of
    failing on it. It encodes parts of ``value`` again: for error paths only."""
    try:
        return _json_problem(value, path)
    except RecursionError:
        return path, "nests too deeply"


def _json_problem(value: Any, path: str) -> tuple[str, str] | None:
    try:
        _json_encode(value)
        return None
    except (TypeError, ValueError) as exc:
        problem = str(exc)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float)) or isinstance(key, bool):
                return path, f"key {key!r} is not a string"
            found = _json_problem(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _json_problem(item, f"{path}[{index}]")
            if found:
                return found
    return path, problem


class IosRecord(msgspec.Struct, kw_only=True):
    """An app's APNs credentials as stored (secrets included: never send or log them)."""

    bundle_id: str
    environment: Literal["production", "sandbox", "both"]
    auth: Literal["token", "certificate"]
    key_pem: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    #: Certificate and its private key, PEM (a .p12 is converted when registered).
    certificate_pem: str | None = None
    certificate_subject: str | None = None
    certificate_expires: datetime | None = None
    certificate_topics: list[str] = []
    updated: datetime

    def info(self) -> api.IosAppInfo:
        """The public view: everything but the secrets."""
        return api.IosAppInfo(
            bundle_id=self.bundle_id,
            environment=self.environment,
            auth=self.auth,
            updated=self.updated,
            key_id=self.key_id,
            team_id=self.team_id,
            certificate_subject=self.certificate_subject,
            certificate_expires=self.certificate_expires,
            certificate_topics=self.certificate_topics,
        )


class AndroidRecord(msgspec.Struct, kw_only=True):
    """An app's FCM credentials as stored: its Firebase service account (the private key
    included: never send or log it)."""

    package_name: str
    project_id: str
    client_email: str
    private_key_id: str
    #: PKCS#8 PEM RSA private key.
    private_key_pem: str
    token_uri: str
    updated: datetime

    def info(self) -> api.AndroidAppInfo:
        return api.AndroidAppInfo(
            package_name=self.package_name,
            project_id=self.project_id,
            client_email=self.client_email,
            private_key_id=self.private_key_id,
            updated=self.updated,
        )


class AppRecord(msgspec.Struct, kw_only=True):
    app: str
    ios: IosRecord | None = None
    android: AndroidRecord | None = None
    #: Bumped whenever credentials change, so channels can drop what they built from them.
    version: int = 1
    #: The sandbox the app belongs to (not stored: the store's place of the record says it).
    sandbox: str = "default"

    @property
    def handle(self) -> str:
        """The app's name across sandboxes, for what a channel keeps per app and for logs:
        its id in sandbox ``default``, ``<sandbox>/<id>`` elsewhere (ids hold no ``/``)."""
        return self.app if self.sandbox == "default" else f"{self.sandbox}/{self.app}"

    def info(self) -> api.AppInfo:
        return api.AppInfo(
            app=self.app,
            ios=None if self.ios is None else self.ios.info(),
            android=None if self.android is None else self.android.info(),
        )


class DeliveryJob(msgspec.Struct, kw_only=True):
    """One notification for one push registration."""

    app: AppRecord
    token: str
    #: The registration's platform (``apns``, ``apns-sandbox``, ``fcm``).
    platform: str
    content: api.PushContent | None = None
    #: The APNs payload as it is (instead of ``content``).
    raw: dict[str, Any] | None = None
    #: The FCM message as it is (instead of ``content``).
    fcm_raw: dict[str, Any] | None = None
    apns: api.ApnsOptions = msgspec.field(default_factory=api.ApnsOptions)
    fcm: api.FcmOptions = msgspec.field(default_factory=api.FcmOptions)
    #: The compact tracking envelope placed in the payload (filled by messages and journeys).
    tracking: dict[str, Any] | None = None
    #: The id of the profile it goes to, when known (frequency caps count its deliveries).
    profile: bytes = b""


class DeliveryResult(msgspec.Struct, kw_only=True):
    """What became of a `DeliveryJob`."""

    status: Literal["sent", "failed", "invalid"]
    reason: str | None = None
    #: A readable explanation when the reason alone is not enough.
    detail: str | None = None
    status_code: int | None = None
    provider_id: str | None = None
    unique_id: str | None = None
    attempts: int = 1
    #: For ``invalid``: since when the provider knows the token is dead (µs since the epoch),
    #: if it says (APNs 410); a token registered again after that stays valid.
    invalid_since_us: int | None = None


class CredentialsError(ServerError):
    """An app's stored credentials cannot be used (expired, refused by the provider); the
    message names what is wrong and never quotes them.

    Attributes:
        reason: the result reason its notifications fail with (``CertificateExpired``,
            ``InvalidCredentials``).
    """

    def __init__(self, message: str, reason: str = "InvalidCredentials") -> None:
        super().__init__(message)
        self.reason = reason


class AppVersions:
    """Which app records a channel may still use: jobs read before `Channel.forget_app` (from
    a mailbox, say) carry older credentials, which must not bring back what was retired.

    App versions are store-wide and never reused, so "older than the version registered
    last" is exact, and a deleted app's records are all older than a later registration.
    """

    def __init__(self) -> None:
        self._oldest: dict[str, float] = {}

    def forget(self, app: str, version: int | None) -> None:
        self._oldest[app] = float("inf") if version is None else version

    def stale(self, record: AppRecord) -> bool:
        return record.version < self._oldest.get(record.handle, 0)

    @staticmethod
    def result(record: AppRecord) -> DeliveryResult:
        return DeliveryResult(
            status="failed", reason="CredentialsReplaced", attempts=0,
            detail=f"the credentials of {record.handle} were replaced or deleted while this notification waited",
        )


class Rendered(msgspec.Struct, kw_only=True):
    """What a channel would send for a job (`Channel.render`, for previews)."""

    payload: dict[str, Any] = {}
    headers: dict[str, str] = {}
    size: int = 0
    #: Why it cannot be built (the reason a send would fail with), if so.
    error: str | None = None
    detail: str | None = None


class Channel:
    """Base class of delivery channels.

    Attributes:
        name: the channel's name (``apns``).
        platforms: registration platforms it delivers to (``{"apns", "apns-sandbox"}``).
        app_platform: the apps whose credentials it checks (``ios`` or ``android``, see
            `check_app`), or None.
    """

    name: ClassVar[str]
    platforms: ClassVar[frozenset[str]]
    app_platform: ClassVar[str | None] = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the channel's long-lived tasks (connection pools); report ready at once."""
        task_status.started()
        await trio.sleep_forever()

    async def send(self, jobs: list[DeliveryJob]) -> list[DeliveryResult]:
        """Deliver ``jobs`` and return their results in the same order.

        Never raises for a job's failure: each becomes a ``failed`` result with a reason.
        """
        raise NotImplementedError

    def check_app(self, request: Any) -> Any:
        """Check the credentials of an ``apps.register-ios`` or ``apps.register-android``
        request (for a channel with an ``app_platform``) and return what `AppRecord` keeps of
        them (`IosRecord`, `AndroidRecord`); raise `InvalidArgument` naming what is wrong."""
        raise NotImplementedError

    def forget_app(self, app: str, version: int | None = None) -> None:
        """The credentials of the app ``app`` (its `AppRecord.handle`, which tells apps of the
        same id in two sandboxes apart) changed (its record is now ``version``) or it was deleted
        (``None``): retire what was built from older versions (connection pools), once what
        was already handed over is settled, and refuse jobs that still carry an older
        version (`AppVersions`)."""

    def render(self, job: DeliveryJob) -> Rendered:
        """The payload ``job`` would be sent with, without sending it (previews)."""
        return Rendered(error="NotSupported", detail=f"channel {self.name} cannot preview")

    def statistics(self) -> dict[str, Any]:
        return {}
