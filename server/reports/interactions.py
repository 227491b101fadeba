"""Push interactions: the events the app reports about a notification (opened, a button
action, received, dismissed), attributed to the message, version, journey and node of the
tracking envelope the notification carried.

Ingestion hands each batch of committed events to `push_interactions`; what it returns goes to
the reporting actor (`Reporting.record_many`), which counts it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from protocols import api
from server.profiles.store import InEvent
from server.reports.reporting import ReportEvent, counted, journey_dimension

__all__ = ["INTERACTIONS", "push_interactions"]


#: Push interaction event types (Adobe's, which its SDKs send) and the report metric of each.
INTERACTIONS = {
    "pushTracking.applicationOpened": "opened",
    "pushTracking.customAction": "action",
    "pushTracking.received": "received",
    "pushTracking.dismissed": "dismissed",
}


_NAME = re.compile(api.NAME_PATTERN)


def _names_ok(tracking: dict[str, Any]) -> bool:
    """The envelope's message (and journey and node) are names as Pigeon gives them: they
    become report keys, which must stay short."""
    return isinstance(tracking.get("m"), str) and all(
        isinstance(tracking.get(k, ""), str) and (k not in tracking or _NAME.fullmatch(tracking[k])) for k in ("m", "j", "n"))


def push_interactions(events: list[InEvent], sandbox: str = "default") -> list[ReportEvent]:
    """The report events of the push interactions among ``events``: their data carries the
    notification's tracking envelope under ``_p`` (a map, or its JSON text as FCM data
    holds it), and for an action its ``actionId``; ``app`` and ``platform`` when the app
    sends them."""
    out = []
    for identity, type_, _, raw in events:
        metric = INTERACTIONS.get(type_)
        if metric is None:
            continue
        try:
            data = msgspec.msgpack.decode(raw)
            tracking = data.get("_p") if isinstance(data, dict) else None
            if isinstance(tracking, str):
                tracking = msgspec.json.decode(tracking)
        except (msgspec.DecodeError, AttributeError):
            continue
        if not isinstance(tracking, dict) or not _names_ok(tracking):
            continue  # not one of ours
        if not counted(tracking):
            continue  # a test send's
        version = tracking.get("v")
        out.append(ReportEvent(
            outcome=metric,
            sandbox=sandbox,
            message=tracking["m"],
            version=version if isinstance(version, int) else 0,
            journey=journey_dimension(str(tracking.get("j", "")), tracking.get("jv")),
            node=str(tracking.get("n", "")),
            app=str(data.get("app", "")),
            platform=str(data.get("platform", "")),
            reason=str(data.get("actionId", "")) if metric == "action" else "",
            profile=identity,
        ))
    return out
