"""What the CLI prints: a readable summary of each response (``show_*``), or the response as JSON.

The JSON output shows every field of a response, defaults included (``to_json``, and
``json_line`` for streamed output, one item per line).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import msgspec.structs

from protocols import api

__all__ = [
    "json_line", "short_token", "show_app", "show_app_deleted", "show_apps", "show_config", "show_configs",
    "show_consent", "show_event", "show_health", "show_ingest", "show_message", "show_message_document",
    "show_messages", "show_preview", "show_profile", "show_profile_deleted", "show_push", "show_report",
    "show_send", "show_stats", "show_token_registered", "show_token_unregistered", "table", "to_json", "when",
    "show_secrets_rotated",
]


# ---------------------------------------------------------------------------------------------
# JSON and tables


def _complete(value: Any) -> Any:
    """``value`` with every field of its structs, defaults included.

    The wire omits a field at its default (a registration's ``state`` while it is active);
    the JSON output shows what the text view shows, so a script can read it there too.
    """
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        out = {config.tag_field: config.tag} if config.tag_field else {}
        out.update((f.encode_name, _complete(getattr(value, f.name))) for f in msgspec.structs.fields(value))
        return out
    if isinstance(value, dict):
        return {key: _complete(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_complete(item) for item in value]
    return value


def to_json(obj: Any) -> str:
    """``obj`` as indented JSON, every field included."""
    return json.dumps(json.loads(msgspec.json.encode(_complete(obj))), indent=2, ensure_ascii=False)


def json_line(obj: Any) -> str:
    """One JSON document on one line (streamed output: one item per line)."""
    return msgspec.json.encode(_complete(obj)).decode()


def when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def short_token(token: str) -> str:
    return token if len(token) <= 24 else f"{token[:10]}…{token[-10:]}"


# ---------------------------------------------------------------------------------------------
# the server


def show_health(h: api.Health) -> str:
    return f"{h.status} (pigeon {h.version}, protocol {h.protocol}, up {h.uptime_s:.0f}s)"


def show_stats(s: api.Stats) -> str:
    pr = s.process
    out = [
        f"pigeon {s.version}, up {s.uptime_s:.0f}s, pid {pr.pid}, cpu {pr.cpu_user_s + pr.cpu_system_s:.2f}s, "
        f"rss {pr.rss_bytes / 2**20:.1f} MiB",
        "",
        table(
            [[a.name, a.state, str(a.restarts), str(a.crashes), f"{a.mailbox_used}/{a.mailbox_size}", a.last_error or ""] for a in s.actors],
            ["ACTOR", "STATE", "RESTARTS", "CRASHES", "MAILBOX", "LAST ERROR"],
        ),
        "",
        f"connections: {s.connections.open} open, {s.connections.accepted} accepted, "
        f"{s.connections.closed_by_protocol_error} closed for protocol errors",
        "store: restarting"
        if s.store is None
        else f"store: {s.store.profiles} profiles, {s.store.identities} identities, {s.store.tokens} tokens, "
        f"{s.store.events} events; {s.store.used_bytes / 2**20:.1f} of {s.store.map_size / 2**20:.0f} MiB map; "
        f"{s.store.commits} commits for {s.store.writes} writes",
    ]
    journeys = next((a.details for a in s.actors if a.name == "journeys" and a.details), None)
    if journeys is not None:
        out.append(f"journeys: {journeys.get('live_journeys', 0)} live, {journeys.get('entered', 0)} entered, "
                   f"{journeys.get('steps', 0)} steps, {journeys.get('timers_fired', 0)} timers fired, "
                   f"{journeys.get('quarantined', 0)} quarantined; event log read to {journeys.get('position', 0)} "
                   f"of {journeys.get('log_end', 0)}")
    if s.methods:
        out += [
            "",
            table(
                [[name, str(m.calls), str(m.errors), f"{m.p50_us:.0f}", f"{m.p99_us:.0f}"] for name, m in s.methods.items()],
                ["METHOD", "CALLS", "ERRORS", "P50 µs", "P99 µs"],
            ),
        ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# profiles, tokens, consent, events


def show_profile(p: api.Profile) -> str:
    out = [f"profile {p.identities[0]}"]
    if len(p.identities) > 1:
        out.append(f"  also known as: {', '.join(p.identities[1:])}")
    out.append(f"  created {when(p.created)}, updated {when(p.updated)}")
    out.append("attributes:")
    attrs = list(_flatten(p.attributes))
    out += [f"  {k} = {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in attrs if k] or ["  (none)"]
    out.append("push registrations:")
    if p.registrations:
        rows = [
            [r.app, r.platform, short_token(r.token), r.state + (f" ({r.invalid_reason})" if r.invalid_reason else ""), when(r.last_seen)]
            for r in p.registrations
        ]
        out += ["  " + line for line in table(rows, ["APP", "PLATFORM", "TOKEN", "STATE", "LAST SEEN"]).splitlines()]
    else:
        out.append("  (none)")
    out.append("consent:")
    out += [f"  {app}: push {c.push} since {when(c.updated)}" for app, c in p.consent.items()] or ["  (none)"]
    return "\n".join(out)


def show_profile_deleted(d: api.ProfileDeleted) -> str:
    return f"deleted profile {', '.join(d.identities)}: {d.registrations} registration(s), {d.events} event(s)"


def show_token_registered(r: api.TokenRegistered) -> str:
    return (f"registered {short_token(r.registration.token)} for {r.registration.app} ({r.registration.platform})"
            + (f"; moved from {r.moved_from}" if r.moved_from else "") + ("; profile created" if r.created_profile else "")
            + "".join(f"\nevicted {short_token(e.token)} for {e.app} ({e.platform}), the profile's least recently seen"
                      " registration (store.max_registrations)" for e in r.evicted))


def show_token_unregistered(r: api.TokenUnregistered) -> str:
    return f"unregistered from profile {r.identity}"


def show_consent(c: api.ConsentEntry) -> str:
    return f"push {c.push} since {when(c.updated)}"


def show_event(e: api.StoredEvent) -> str:
    data = json.dumps(e.data, ensure_ascii=False, default=str) if e.data else ""
    return f"{when(e.ts)}  #{e.seq}  {e.type}  {data}".rstrip()


def show_ingest(r: api.IngestResult) -> str:
    lines = [f"accepted {r.accepted} event(s)" + (f", last seq {r.last_seq}" if r.accepted else "")]
    lines += [f"rejected #{x.index}: {x.code}: {x.message}" for x in r.rejected]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# apps and push


def show_app(a: api.AppInfo) -> str:
    out = [f"app {a.app}"]
    if a.ios is None:
        out.append("  ios: (no credentials)")
    else:
        i = a.ios
        out.append(f"  ios: bundle {i.bundle_id}, {i.environment}, {i.auth} auth, registered {when(i.updated)}")
        if i.auth == "token":
            out.append(f"    key id {i.key_id}, team id {i.team_id}")
        else:
            out.append(f"    certificate {i.certificate_subject}, expires {when(i.certificate_expires)}")
            if i.certificate_topics:
                out.append(f"    topics {', '.join(i.certificate_topics)}")
    if a.android is None:
        out.append("  android: (no credentials)")
    else:
        d = a.android
        out.append(f"  android: package {d.package_name}, Firebase project {d.project_id}, registered {when(d.updated)}")
        out.append(f"    service account {d.client_email}, key id {d.private_key_id}")
    return "\n".join(out)


def show_apps(r: api.AppList) -> str:
    return "\n\n".join(show_app(x) for x in r.apps) or "(no apps)"


def show_app_deleted(r: api.AppDeleted) -> str:
    return f"deleted app {r.app}"


def show_push(r: api.PushSent) -> str:
    if r.excluded:
        return f"nothing sent: {r.excluded}"
    rows = [
        [o.status, o.platform, short_token(o.token), o.reason or "", o.provider_id or "", str(o.attempts), o.detail or ""]
        for o in r.outcomes
    ]
    return table(rows, ["STATUS", "PLATFORM", "TOKEN", "REASON", "PROVIDER ID", "ATTEMPTS", "DETAIL"])


# ---------------------------------------------------------------------------------------------
# channel configurations and messages


def show_config(c: api.ConfigInfo) -> str:
    config = c.config
    return (f"channel configuration {config.name} v{c.version} ({when(c.published)}): apps {', '.join(config.apps)}, "
            f"{'/'.join(config.platforms)}, consent {config.consent}")


def show_configs(r: api.ConfigList) -> str:
    return "\n".join(show_config(c) for c in r.configs) or "(no configurations)"


def show_message(m: api.MessageInfo) -> str:
    spec = m.message
    templates = f", templates in {', '.join(t.removeprefix('$.content.') for t in m.templates)}" if m.templates else ""
    return f"message {spec.id} v{m.version} ({when(m.published)}) through {spec.channel}{templates}"


def show_message_document(m: api.MessageInfo) -> str:
    """The message's summary line, then the message itself as JSON."""
    return show_message(m) + "\n" + to_json(m.message)


def show_messages(r: api.MessageList) -> str:
    return "\n".join(show_message(m) for m in r.messages) or "(no messages)"


def show_journey(j: api.JourneyInfo) -> str:
    spec = j.journey
    live = f", live version {j.live_version}" if j.live_version not in (None, j.version) else ""
    entry = spec.entry
    way = (f"on event {entry.event}" if entry.event else f"on audience {entry.audience!r}" if entry.audience
           else "from a read audience")
    return (f"journey {spec.id} v{j.version} ({when(j.published)}): {j.state}{live}; entered {way}; "
            f"{len(spec.nodes)} nodes")


def show_journey_document(j: api.JourneyInfo) -> str:
    """The journey's summary line, then the journey itself as JSON (message versions pinned)."""
    return show_journey(j) + "\n" + to_json(j.journey)


def show_journeys(r: api.JourneyList) -> str:
    return "\n".join(show_journey(j) for j in r.journeys) or "(no journeys)"


_JOURNEY_COLUMNS = ("entered", "exited", "targeted", "excluded", "sent", "delivered", "failed", "opened", "action",
                    "goal")


def show_journey_report(info: api.JourneyInfo, rows: list[tuple[api.JourneyNode, api.Report]]) -> str:
    """A journey's counts, a row per node, then why instances exited and pushes were excluded."""
    table_rows = [[node.id, type(node).__name__.removesuffix("Node").lower(),
                   *(str(report.totals.get(c, 0)) for c in _JOURNEY_COLUMNS), str(info.waiting.get(node.id, 0))]
                  for node, report in rows]
    out = [f"{show_journey(info)}; {info.running} running now", table(table_rows, ["NODE", "TYPE", *(c.upper() for c in _JOURNEY_COLUMNS), "WAITING"])]
    for node, report in rows:
        for metric in ("exited", "excluded", "failed"):
            reasons = report.reasons.get(metric)
            if reasons:
                out.append(f"{node.id}: {metric} " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return "\n".join(out)


def show_simulation(s: api.Simulation) -> str:
    """The trace of a simulated instance, a line a step, then where it ended up."""
    lines = [f"journey {s.journey}" + (f" v{s.version}" if s.version else " (as given)")]
    for step in s.steps:
        lines.append(f"{when(step.at)}  {step.node:<16} {step.kind:<9} {step.detail}")
        for push in step.pushes:
            lines.append(f"{'':>22}-> {push.platform} {short_token(push.token)} ({push.app}): "
                         + (f"{push.error}: {push.detail}" if push.error else json.dumps(push.payload, separators=(",", ":"))))
    if s.outcome == "not_entered":
        lines.append(f"not entered: {s.reason}")
    elif s.outcome == "ended":
        lines.append(f"ended at {s.node}: {s.reason}")
    else:
        lines.append(f"waiting at {s.node}" + (f" until {when(s.wake)}" if s.wake else ""))
    return "\n".join(lines)


def show_preview(p: api.Preview) -> str:
    if p.excluded:
        return f"message {p.id} v{p.version}: this profile would be excluded: {p.excluded}: {p.detail}"
    out = [f"message {p.id} v{p.version}"]
    for item in p.previews:
        head = f"{item.platform} ({item.app})"
        if item.error:
            out.append(f"  {head}: cannot be built: {item.error}" + (f": {item.detail}" if item.detail else ""))
            continue
        out.append(f"  {head}, {item.size} bytes:")
        if item.headers:
            out.append("    " + " ".join(f"{k}: {v}" for k, v in item.headers.items()))
        out.append("    " + json.dumps(item.payload, ensure_ascii=False))
    return "\n".join(out)


def show_send(r: api.SendResult) -> str:
    def reasons(counts: dict[str, int]) -> str:
        return f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})" if counts else ""

    out = [f"message {r.message} v{r.version}, execution {r.execution}: {r.profiles} profile(s), "
           f"{r.targeted} targeted, {sum(r.excluded.values())} excluded{reasons(r.excluded)}, {r.sent} sent, "
           f"{r.delivered} delivered, {sum(r.failed.values())} failed{reasons(r.failed)}, {r.bounced} bounced"]
    if r.unknown:
        more = ", ..." if r.unknown > len(r.unknown_identities) else ""
        out.append(f"{r.unknown} identit{'y' if r.unknown == 1 else 'ies'} matched no profile (nothing sent): "
                   f"{', '.join(r.unknown_identities)}{more}")
    out += [f"{reason}: {detail}" for reason, detail in sorted(r.details.items())]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# reports


_REPORT_COLUMNS = ("targeted", "excluded", "sent", "delivered", "failed", "bounced", "opened", "unique_opened", "action")


def show_report(r: api.Report) -> str:
    rows = [["all", *(str(r.totals.get(c, 0)) for c in _REPORT_COLUMNS)]]
    rows += [[f"platform {name or '(none)'}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)]
             for name, row in sorted(r.by_platform.items())]
    rows += [[f"app {name or '(none)'}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)] for name, row in sorted(r.by_app.items())]
    rows += [[f"journey {name}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)]
             for name, row in sorted(r.by_journey.items()) if name]
    out = [table(rows, ["", *(c.upper().replace("UNIQUE_OPENED", "UNIQUE OPENS") for c in _REPORT_COLUMNS)])]
    if r.open_rate is not None:
        out.append(f"open rate {r.open_rate:.1%}")
    for metric, reasons in sorted(r.reasons.items()):
        out.append(f"{metric}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    if r.window == "live" and r.minutes:
        last = r.minutes[-1]
        out.append(f"last minute with activity: {when(last.start)} " + ", ".join(f"{k} {v}" for k, v in sorted(last.counts.items())))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# API keys


def show_created_key(c: api.CreatedKey) -> str:
    i = c.info
    return (f"{c.key}\n\nAPI key {i.id} ({', '.join(i.scopes)}{', ' + repr(i.name) if i.name else ''}): "
            "shown this once; keep it where its users read it (PIGEON_API_KEY, --api-key)")


def show_keys(r: api.KeyList) -> str:
    rows = [[k.id, ",".join(k.scopes), k.sandbox, k.name or "-", when(k.created), when(k.last_used)] for k in r.keys]
    return table(rows, ["ID", "SCOPES", "SANDBOX", "NAME", "CREATED", "LAST USED"]) if rows else "(no keys)"


def show_key_revoked(r: api.KeyRevoked) -> str:
    return f"revoked API key {r.id} ({r.connections_closed} open connections closed)"


def show_sandbox(r: api.SandboxInfo) -> str:
    return f"sandbox {r.name} created; its first key: pigeon keys create admin --in {r.name}"


def show_sandboxes(r: api.SandboxList) -> str:
    return table([[s.name, when(s.created)] for s in r.sandboxes], ["SANDBOX", "CREATED"])


def show_secrets_rotated(r: api.SecretsRotated) -> str:
    return (f"master key rotated: {r.resealed} sealed values re-encrypted under the new key {r.fingerprint}; "
            f"{r.key_file} holds it alone (keep a copy apart from backups of the data folder)")
