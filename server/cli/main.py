"""The ``pigeon`` command line.

``pigeon serve`` runs a server; every other command is a client of one (``--server``, or
``PIGEON_SERVER``, default 127.0.0.1:7600) and prints a readable summary, or the response
as JSON with ``--json`` (every field, defaults included). Options common to the client
commands may come before or after the command. Exit status: 0 on success; 1 when the server
could not do it (not found, refused for a reason other than the input, a notification not
sent) or could not be reached; 2 for bad input, whoever found it (a usage error, a file or
value the CLI or the server refused: ``INVALID_ARGUMENT``) and for a configuration error;
141 when the output was closed early (``| head``), quietly, as other Unix tools do.
Bare ``pigeon`` (or a command group without its subcommand) prints its help, with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import ssl
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import msgspec.structs
import trio

from protocols import api
from protocols.errors import CallError, ConnectionClosed, NotPigeonServer, PigeonProtocolError, Status
from protocols.frames import PROTOCOL_VERSION
from protocols._client_core import parse_target
from protocols.trio_client import BatchFailed, Client, open_client

from server.runtime.config import DEFAULT_LISTEN, load_config
from server.runtime.errors import ConfigError, RestartIntensityExceeded, ServerError

__all__ = ["main", "COMMANDS"]

log = logging.getLogger("pigeon")

#: The CLI command of every protocol method.
COMMANDS: dict[str, str] = {
    "server.health": "health",
    "server.stats": "stats",
    "profiles.get": "profiles get",
    "profiles.upsert": "profiles upsert",
    "profiles.patch": "profiles patch",
    "profiles.delete": "profiles delete",
    "profiles.link": "profiles link",
    "profiles.unlink": "profiles unlink",
    "tokens.register": "tokens register",
    "tokens.unregister": "tokens unregister",
    "consent.set": "consent set",
    "events.ingest": "events send / events import",
    "events.list": "events list",
    "apps.register_ios": "apps register-ios",
    "apps.register_android": "apps register-android",
    "apps.get": "apps get",
    "apps.list": "apps list",
    "apps.delete": "apps delete",
    "push.send": "push send",
    "configs.publish": "configs publish",
    "configs.get": "configs get",
    "configs.list": "configs list",
    "messages.publish": "messages publish",
    "messages.get": "messages get",
    "messages.list": "messages list",
    "messages.preview": "messages preview",
    "messages.send": "messages send",
    "reports.get": "reports",
    "reports.watch": "reports --watch",
}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------
# output


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


def _json(obj: Any) -> str:
    return json.dumps(json.loads(msgspec.json.encode(_complete(obj))), indent=2, ensure_ascii=False)


def _json_line(obj: Any) -> str:
    """One JSON document on one line (streamed output: one item per line)."""
    return msgspec.json.encode(_complete(obj)).decode()


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _short_token(token: str) -> str:
    return token if len(token) <= 24 else f"{token[:10]}…{token[-10:]}"


def show_profile(p: api.Profile) -> str:
    out = [f"profile {p.identities[0]}"]
    if len(p.identities) > 1:
        out.append(f"  also known as: {', '.join(p.identities[1:])}")
    out.append(f"  created {_when(p.created)}, updated {_when(p.updated)}")
    out.append("attributes:")
    attrs = list(_flatten(p.attributes))
    out += [f"  {k} = {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in attrs if k] or ["  (none)"]
    out.append("push registrations:")
    if p.registrations:
        rows = [
            [r.app, r.platform, _short_token(r.token), r.state + (f" ({r.invalid_reason})" if r.invalid_reason else ""), _when(r.last_seen)]
            for r in p.registrations
        ]
        out += ["  " + line for line in _table(rows, ["APP", "PLATFORM", "TOKEN", "STATE", "LAST SEEN"]).splitlines()]
    else:
        out.append("  (none)")
    out.append("consent:")
    out += [f"  {app}: push {c.push} since {_when(c.updated)}" for app, c in p.consent.items()] or ["  (none)"]
    return "\n".join(out)


def show_stats(s: api.Stats) -> str:
    pr = s.process
    out = [
        f"pigeon {s.version}, up {s.uptime_s:.0f}s, pid {pr.pid}, cpu {pr.cpu_user_s + pr.cpu_system_s:.2f}s, "
        f"rss {pr.rss_bytes / 2**20:.1f} MiB",
        "",
        _table(
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
    if s.methods:
        out += [
            "",
            _table(
                [[name, str(m.calls), str(m.errors), f"{m.p50_us:.0f}", f"{m.p99_us:.0f}"] for name, m in s.methods.items()],
                ["METHOD", "CALLS", "ERRORS", "P50 µs", "P99 µs"],
            ),
        ]
    return "\n".join(out)


def show_app(a: api.AppInfo) -> str:
    out = [f"app {a.app}"]
    if a.ios is None:
        out.append("  ios: (no credentials)")
    else:
        i = a.ios
        out.append(f"  ios: bundle {i.bundle_id}, {i.environment}, {i.auth} auth, registered {_when(i.updated)}")
        if i.auth == "token":
            out.append(f"    key id {i.key_id}, team id {i.team_id}")
        else:
            out.append(f"    certificate {i.certificate_subject}, expires {_when(i.certificate_expires)}")
            if i.certificate_topics:
                out.append(f"    topics {', '.join(i.certificate_topics)}")
    if a.android is None:
        out.append("  android: (no credentials)")
    else:
        d = a.android
        out.append(f"  android: package {d.package_name}, Firebase project {d.project_id}, registered {_when(d.updated)}")
        out.append(f"    service account {d.client_email}, key id {d.private_key_id}")
    return "\n".join(out)


def show_push(r: api.PushSent) -> str:
    if r.excluded:
        return f"nothing sent: {r.excluded}"
    rows = [
        [o.status, o.platform, _short_token(o.token), o.reason or "", o.provider_id or "", str(o.attempts), o.detail or ""]
        for o in r.outcomes
    ]
    return _table(rows, ["STATUS", "PLATFORM", "TOKEN", "REASON", "PROVIDER ID", "ATTEMPTS", "DETAIL"])


def show_event(e: api.StoredEvent) -> str:
    data = json.dumps(e.data, ensure_ascii=False, default=str) if e.data else ""
    return f"{_when(e.ts)}  #{e.seq}  {e.type}  {data}".rstrip()


def show_ingest(r: api.IngestResult) -> str:
    lines = [f"accepted {r.accepted} event(s)" + (f", last seq {r.last_seq}" if r.accepted else "")]
    lines += [f"rejected #{x.index}: {x.code}: {x.message}" for x in r.rejected]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# input


#: What a parser's RecursionError means: input nested deeper than the parser follows.
TOO_DEEP = "nested too deeply (arrays or objects inside each other, hundreds of levels)"


def _parse_json_object(text: str, what: str) -> dict[str, Any]:
    if text.startswith("@"):
        path = text[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {what} from {path!r}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} is {TOO_DEEP}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _parse_time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an ISO 8601 time (2026-11-22T10:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _event(identity: str, type_: str, data: dict[str, Any], ts: datetime | None) -> api.Event:
    try:
        return msgspec.convert({"identity": identity, "type": type_, "data": data, "ts": ts}, api.Event)
    except msgspec.ValidationError as exc:
        raise UsageError(f"bad event: {api.describe_validation_error(exc)[0]}") from None


# ---------------------------------------------------------------------------------------------
# commands


Action = Callable[[Client, argparse.Namespace], Any]


async def _simple(request: api.Request[Any], show: Callable[[Any], str] | None, args: argparse.Namespace, client: Client) -> None:
    with trio.fail_after(args.timeout):
        result = await client.call(request)
    print(_json(result) if args.json or show is None else show(result))


def _req(build: Callable[[argparse.Namespace], api.Request[Any]], show: Callable[[Any], str] | None) -> Action:
    async def action(client: Client, args: argparse.Namespace) -> None:
        await _simple(build(args), show, args, client)

    return action


async def _events_send(client: Client, args: argparse.Namespace) -> None:
    data = _parse_json_object(args.data, "--data") if args.data else {}
    event = _event(args.identity, args.type, data, _parse_time(args.ts, "--ts"))
    with trio.fail_after(args.timeout):
        result = await client.call(api.IngestEvents(events=[event]))
    print(_json(result) if args.json else show_ingest(result))
    if result.rejected:
        raise SystemExit(1)


async def _events_import(client: Client, args: argparse.Namespace) -> None:
    try:
        source = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc.strerror}") from None
    decoder = msgspec.json.Decoder(api.Event)
    invalid = []
    lines = 0
    stopped: BatchFailed | None = None
    batcher = client.event_batcher(batch_size=args.batch_size, call_timeout=args.timeout)
    try:
        async with batcher:
            for lineno, line in enumerate(source, 1):
                if not line.strip():
                    continue
                lines += 1
                try:
                    event = decoder.decode(line)
                except msgspec.DecodeError as exc:
                    invalid.append(f"line {lineno}: {exc}")
                    continue
                except RecursionError:
                    invalid.append(f"line {lineno}: {TOO_DEEP}")
                    continue
                await batcher.add(event)
    except BatchFailed as exc:
        stopped = exc
    finally:
        if source is not sys.stdin:
            source.close()
    summary = {"lines": lines, "accepted": batcher.accepted, "invalid": invalid,
               "rejected": [r.message for _, r in batcher.rejected],
               "not_acknowledged": sum(len(f.events) for f in batcher.failed)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{lines} line(s): {batcher.accepted} event(s) accepted, {len(invalid)} invalid, {len(batcher.rejected)} rejected"
              + (f", {summary['not_acknowledged']} not acknowledged" if stopped else ""))
        for problem in invalid + summary["rejected"]:
            print(f"  {problem}")
    if stopped is not None:
        print(f"pigeon: some batches failed: {stopped.error}", file=sys.stderr)
    if invalid or batcher.rejected or stopped:
        raise SystemExit(1)


async def _events_list(client: Client, args: argparse.Namespace) -> None:
    request = api.ListEvents(
        identity=args.identity,
        type=args.type,
        since=_parse_time(args.since, "--since"),
        until=_parse_time(args.until, "--until"),
        limit=args.limit,
        reverse=args.reverse,
    )
    count = 0
    async with client.stream(request) as events:
        async for event in events:
            count += 1
            print(_json_line(event) if args.json else show_event(event))
    if not args.json and count == 0:
        print("(no events)")


def _read_file(path: str, what: str, *, binary: bool = False) -> Any:
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _register_ios(args: argparse.Namespace) -> api.RegisterIosApp:
    password = os.environ.get(args.password_env) if args.password_env else None
    chosen = [name for name in ("p8", "p12", "pem") if getattr(args, name)]
    if len(chosen) != 1:
        raise UsageError("give one of --p8 (token auth), --p12 or --pem (certificate auth)")
    if args.p8:
        if not (args.key_id and args.team_id):
            raise UsageError("--p8 needs --key-id and --team-id")
        auth: Any = api.ApnsTokenAuth(key_pem=_read_file(args.p8, "the .p8 key"), key_id=args.key_id, team_id=args.team_id)
    elif args.p12:
        auth = api.ApnsCertificateAuth(pkcs12=_read_file(args.p12, "the .p12 file", binary=True), password=password)
    else:
        auth = api.ApnsCertificateAuth(pem=_read_file(args.pem, "the PEM file"), password=password)
    return api.RegisterIosApp(app=args.app, bundle_id=args.bundle_id, environment=args.environment, auth=auth)


def _register_android(args: argparse.Namespace) -> api.RegisterAndroidApp:
    text = _read_file(args.service_account, "the service account key file")
    try:
        account = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the service account key file {args.service_account!r} is not JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"the service account key file {args.service_account!r} is {TOO_DEEP}") from None
    if not isinstance(account, dict):
        raise UsageError(f"the service account key file {args.service_account!r} does not hold a JSON object")
    return api.RegisterAndroidApp(app=args.app, package_name=args.package_name, service_account=account)


def _load_document(path: str, kind: type) -> Any:
    """A YAML or JSON file as ``kind``; errors name the file and the field."""
    import yaml

    text = _read_file(path, "the file")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UsageError(f"{path}: {where}not valid YAML or JSON: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: {TOO_DEEP}") from None
    try:
        return msgspec.convert(doc, kind)
    except msgspec.ValidationError as exc:
        raise UsageError(f"{path}: {api.describe_validation_error(exc, kind)[0]}") from None
    except RecursionError:
        raise UsageError(f"{path}: {TOO_DEEP}") from None


def _publisher(kind: type, request: Callable[[Any], api.Request[Any]], show: Callable[[Any], str]) -> Action:
    async def action(client: Client, args: argparse.Namespace) -> None:
        for path in args.files:
            document = _load_document(path, kind)
            try:
                with trio.fail_after(args.timeout):
                    result = await client.call(request(document))
            except CallError as exc:
                raise CallError(exc.status, f"{path}: {exc.message}", field=exc.field) from None
            print(_json(result) if args.json else f"{path}: {show(result)}")

    return action


def show_config(c: api.ConfigInfo) -> str:
    config = c.config
    return (f"channel configuration {config.name} v{c.version} ({_when(c.published)}): apps {', '.join(config.apps)}, "
            f"{'/'.join(config.platforms)}, consent {config.consent}")


def show_message(m: api.MessageInfo) -> str:
    spec = m.message
    templates = f", templates in {', '.join(t.removeprefix('$.content.') for t in m.templates)}" if m.templates else ""
    return f"message {spec.id} v{m.version} ({_when(m.published)}) through {spec.channel}{templates}"


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


def _send_request(args: argparse.Namespace) -> api.SendMessage:
    return api.SendMessage(
        id=args.id, version=args.version, identities=args.identities or [], audience=args.audience, test=args.test,
        event=_parse_json_object(args.event, "--event") if args.event else {},
    )


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


_REPORT_COLUMNS = ("targeted", "excluded", "sent", "delivered", "failed", "bounced", "opened", "unique_opened", "action")


def show_report(r: api.Report) -> str:
    rows = [["all", *(str(r.totals.get(c, 0)) for c in _REPORT_COLUMNS)]]
    rows += [[f"platform {name or '(none)'}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)]
             for name, row in sorted(r.by_platform.items())]
    rows += [[f"app {name or '(none)'}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)] for name, row in sorted(r.by_app.items())]
    rows += [[f"journey {name}", *(str(row.get(c, 0)) for c in _REPORT_COLUMNS)]
             for name, row in sorted(r.by_journey.items()) if name]
    out = [_table(rows, ["", *(c.upper().replace("UNIQUE_OPENED", "UNIQUE OPENS") for c in _REPORT_COLUMNS)])]
    if r.open_rate is not None:
        out.append(f"open rate {r.open_rate:.1%}")
    for metric, reasons in sorted(r.reasons.items()):
        out.append(f"{metric}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    if r.window == "live" and r.minutes:
        last = r.minutes[-1]
        out.append(f"last minute with activity: {_when(last.start)} " + ", ".join(f"{k} {v}" for k, v in sorted(last.counts.items())))
    return "\n".join(out)


async def _reports(client: Client, args: argparse.Namespace) -> None:
    filters = {"message": args.message, "version": args.version, "journey": args.journey, "node": args.node,
               "app": args.app, "platform": args.platform, "window": "live" if args.live else "all_time"}
    if args.watch is None:
        with trio.fail_after(args.timeout):
            result = await client.call(api.GetReport(**filters))
        print(_json(result) if args.json else show_report(result))
        return
    # The server streams a report whenever the counts change; until interrupted.
    async with client.stream(api.WatchReport(**filters, interval_s=args.watch)) as reports:
        async for result in reports:
            if args.json:
                print(_json_line(result), flush=True)  # one report per line
            else:
                print("\x1b[H\x1b[2J" + show_report(result), flush=True)  # refresh in place


def _preview_request(args: argparse.Namespace) -> api.PreviewMessage:
    if (args.identity is None) == (args.profile is None):
        raise UsageError("give --identity or --profile")
    return api.PreviewMessage(
        id=args.id, version=args.version, identity=args.identity,
        profile=_parse_json_object(args.profile, "--profile") if args.profile else None,
        event=_parse_json_object(args.event, "--event") if args.event else {},
    )


def _push_request(args: argparse.Namespace) -> api.SendPush:
    fcm_raw = _parse_json_object(args.fcm_raw, "--fcm-raw") if args.fcm_raw else None
    if args.raw or fcm_raw is not None:
        raw = _parse_json_object(args.raw, "--raw") if args.raw else None
        content = None
    else:
        raw = None
        fields = {
            name: getattr(args, name)
            for name in ("title", "subtitle", "body", "badge", "sound", "category", "thread_id", "media_url",
                         "deeplink", "interruption_level")
            if getattr(args, name) is not None
        }
        if args.data:
            fields["data"] = _parse_json_object(args.data, "--data")
        if args.content_available:
            fields["content_available"] = True
        if args.mutable_content:
            fields["mutable_content"] = True
        content = api.PushContent(**fields)
    options: dict[str, Any] = {"push_type": args.push_type}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.expiration is not None:
        options["expiration"] = _parse_time(args.expiration, "--expiration")
    if args.collapse_id is not None:
        options["collapse_id"] = args.collapse_id
    fcm: dict[str, Any] = {}
    for name in ("priority", "ttl_s", "collapse_key", "channel_id", "notification_priority", "visibility", "tag",
                 "click_action", "color", "icon"):
        value = getattr(args, f"fcm_{name}")
        if value is not None:
            fcm[name] = value
    if args.data_only:
        fcm["data_only"] = True
    try:
        apns = msgspec.convert(options, api.ApnsOptions)
        fcm_options = msgspec.convert(fcm, api.FcmOptions)
    except msgspec.ValidationError as exc:
        raise UsageError(api.describe_validation_error(exc)[0]) from None
    return api.SendPush(
        app=args.app, token=args.token, platform=args.platform, identity=args.identity, content=content, raw=raw,
        fcm_raw=fcm_raw, apns=apns, fcm=fcm_options,
    )


async def _push_send(client: Client, args: argparse.Namespace) -> None:
    with trio.fail_after(args.timeout):
        result = await client.call(_push_request(args))
    print(_json(result) if args.json else show_push(result))
    if result.excluded or any(o.status != "sent" for o in result.outcomes):
        raise SystemExit(1)


def _client_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every client command takes. They are given to the main parser with their
    defaults and to each command without (SUPPRESS), so that they may come before or after
    the command and one given before is not reset by the command's own parser."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    server = os.environ.get("PIGEON_SERVER", DEFAULT_LISTEN)
    parser.add_argument("--server", default=default(server),
                        help=f"HOST:PORT or unix:PATH of the server (env PIGEON_SERVER; default {server})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the response as JSON (every field, defaults included)")
    parser.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")
    parser.add_argument("--ca", metavar="FILE", default=default(None), help="CA certificate to trust for TLS (implies --tls)")
    parser.add_argument("--timeout", type=float, default=default(30.0), metavar="SECONDS",
                        help="deadline for connecting and for each call (default 30)")


def _build_parser() -> argparse.ArgumentParser:
    from server.runtime.app import VERSION

    common = argparse.ArgumentParser(add_help=False)
    _client_options(common, defaults=False)

    parser = argparse.ArgumentParser(
        prog="pigeon", description="Pigeon, a self-hosted push journey server.",
        epilog="Options of the client commands (--server, --json, --tls, --ca, --timeout) may also come after "
               "the command. `pigeon COMMAND --help` shows a command's own options.")
    parser.add_argument("--version", action="version", version=f"pigeon {VERSION} (protocol {PROTOCOL_VERSION})")
    _client_options(parser, defaults=True)
    parser.set_defaults(action=None, group=parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def group(name: str, help: str) -> Any:
        """A command group (``profiles``, ``apps``, ...); without a subcommand it prints its help."""
        p = commands.add_parser(name, help=help)
        p.set_defaults(group=p)
        return p.add_subparsers(dest="sub", metavar="SUBCOMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--data", metavar="DIR", help="data folder (default ./pigeon-data)")
    serve.add_argument("--listen", metavar="ADDR", action="append",
                       help="HOST:PORT or unix:PATH to listen on; repeat for several (default 127.0.0.1:7600)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (default ./pigeon.toml if present)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ready-file", metavar="PATH",
                       help="once listening, write the addresses listened on to PATH (one a line, the port "
                            "chosen for :0 included); removed when the server stops")
    serve.set_defaults(action=None)

    def sub(parent: Any, name: str, help: str, action: Action, flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
        """A client command. ``flags`` maps the request fields that come from a flag (``$.auth.key_pem``)
        to the flag's dest (``p8``), so that the server's error about the field names the flag."""
        p = parent.add_parser(name, help=help, parents=[common])
        p.set_defaults(action=action, flags=flags or {})
        return p

    sub(commands, "health", "is the server serving?", _req(lambda a: api.GetHealth(), lambda h: f"{h.status} (pigeon {h.version}, protocol {h.protocol}, up {h.uptime_s:.0f}s)"))
    sub(commands, "stats", "actors, connections, store and per-method latency", _req(lambda a: api.GetStats(), show_stats))

    profiles = group("profiles", "customer profiles")
    p = sub(profiles, "get", "show a profile", _req(lambda a: api.GetProfile(identity=a.identity), show_profile))
    p.add_argument("identity", help="namespace:value, e.g. crm:42")
    p = sub(profiles, "upsert", "create a profile or replace its attributes",
            _req(lambda a: api.UpsertProfile(identity=a.identity, attributes=_parse_json_object(a.attributes, "attributes")), show_profile))
    p.add_argument("identity")
    p.add_argument("attributes", nargs="?", default="{}", help="JSON object, or @FILE, or @- for stdin")
    p = sub(profiles, "patch", "merge-patch a profile's attributes (null deletes a key)",
            _req(lambda a: api.PatchProfile(identity=a.identity, patch=_parse_json_object(a.patch, "patch"), create=not a.no_create), show_profile))
    p.add_argument("identity")
    p.add_argument("patch", help="JSON object, or @FILE, or @- for stdin")
    p.add_argument("--no-create", action="store_true", help="fail if no profile has this identity")
    p = sub(profiles, "delete", "delete a profile and every trace of it",
            _req(lambda a: api.DeleteProfile(identity=a.identity),
                 lambda d: f"deleted profile {', '.join(d.identities)}: {d.registrations} registration(s), {d.events} event(s)"))
    p.add_argument("identity")
    p = sub(profiles, "link", "add an identity to a profile", _req(lambda a: api.LinkIdentity(identity=a.identity, link=a.link), show_profile))
    p.add_argument("identity")
    p.add_argument("link", help="the identity to add")
    p = sub(profiles, "unlink", "remove an identity from its profile", _req(lambda a: api.UnlinkIdentity(identity=a.identity), show_profile))
    p.add_argument("identity")

    tokens = group("tokens", "push tokens")
    p = sub(tokens, "register", "register a push token on a profile",
            _req(lambda a: api.RegisterToken(identity=a.identity, app=a.app, platform=a.platform, token=a.token),
                 lambda r: f"registered {_short_token(r.registration.token)} for {r.registration.app} ({r.registration.platform})"
                 + (f"; moved from {r.moved_from}" if r.moved_from else "") + ("; profile created" if r.created_profile else "")
                 + "".join(f"\nevicted {_short_token(e.token)} for {e.app} ({e.platform}), the profile's least recently seen"
                           " registration (store.max_registrations)" for e in r.evicted)))
    p.add_argument("identity")
    p.add_argument("--app", required=True, help="bundle id or package name")
    p.add_argument("--platform", required=True, choices=["apns", "apns-sandbox", "fcm"])
    p.add_argument("--token", required=True)
    p = sub(tokens, "unregister", "remove a push token",
            _req(lambda a: api.UnregisterToken(app=a.app, token=a.token), lambda r: f"unregistered from profile {r.identity}"))
    p.add_argument("--app", required=True)
    p.add_argument("--token", required=True)

    consent = group("consent", "push consent")
    p = sub(consent, "set", "opt a profile in or out of an app's push",
            _req(lambda a: api.SetConsent(identity=a.identity, app=a.app, push=a.push), lambda c: f"push {c.push} since {_when(c.updated)}"))
    p.add_argument("identity")
    p.add_argument("--app", required=True)
    p.add_argument("--push", required=True, choices=["in", "out"])

    apps = group("apps", "apps and their provider credentials")
    p = sub(apps, "register-ios", "register an app's APNs credentials (checked now, never shown again)",
            _req(_register_ios, show_app),
            flags={"$.auth.key_pem": "p8", "$.auth.key_id": "key_id", "$.auth.team_id": "team_id", "$.auth.pkcs12": "p12",
                   "$.auth.pem": "pem", "$.auth.password": "password_env", "$.bundle_id": "bundle_id"})
    p.add_argument("app", help="the app id (usually the bundle id)")
    p.add_argument("--bundle-id", help="the APNs topic, if not the app id")
    p.add_argument("--environment", choices=["production", "sandbox", "both"], default="both",
                   help="APNs environments the app uses (default both: a token's platform decides)")
    p.add_argument("--p8", metavar="FILE", help="token auth: the .p8 key file")
    p.add_argument("--key-id", help="token auth: the key's 10-character id")
    p.add_argument("--team-id", help="token auth: the 10-character team id")
    p.add_argument("--p12", metavar="FILE", help="certificate auth: the .p12 file")
    p.add_argument("--pem", metavar="FILE", help="certificate auth: certificate and key in PEM")
    p.add_argument("--password-env", metavar="NAME", help="the environment variable holding the .p12 or key password")
    p = sub(apps, "register-android", "register an app's FCM service account (checked now, never shown again)",
            _req(_register_android, show_app),
            flags={"$.service_account": "service_account", "$.package_name": "package_name"})
    p.add_argument("app", help="the app id (usually the package name)")
    p.add_argument("--service-account", required=True, metavar="FILE",
                   help="the Firebase service account's JSON key file")
    p.add_argument("--package-name", help="the Android package name, if not the app id")
    p = sub(apps, "get", "show an app (without its secrets)", _req(lambda a: api.GetApp(app=a.app), show_app))
    p.add_argument("app")
    sub(apps, "list", "list the registered apps",
        _req(lambda a: api.ListApps(), lambda r: "\n\n".join(show_app(x) for x in r.apps) or "(no apps)"))
    p = sub(apps, "delete", "forget an app and its credentials", _req(lambda a: api.DeleteApp(app=a.app), lambda r: f"deleted app {r.app}"))
    p.add_argument("app")

    push = group("push", "send push notifications")
    p = sub(push, "send", "send one notification now (transactional: no consent or capping rules)", _push_send,
            flags={"$.raw": "raw", "$.fcm_raw": "fcm_raw", "$.content.data": "data"})
    p.add_argument("--app", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--token", help="one device token (with --platform)")
    target.add_argument("--identity", help="every valid token of this profile for the app")
    p.add_argument("--platform", choices=["apns", "apns-sandbox", "fcm"])
    for name in ("title", "subtitle", "body", "sound", "category", "media-url", "deeplink"):
        p.add_argument(f"--{name}")
    p.add_argument("--thread-id")
    p.add_argument("--badge", type=int)
    p.add_argument("--data", help="custom data: a JSON object, or @FILE")
    p.add_argument("--content-available", action="store_true", help="a silent background update")
    p.add_argument("--mutable-content", action="store_true")
    p.add_argument("--interruption-level", choices=["passive", "active", "time-sensitive", "critical"])
    p.add_argument("--raw", help="the APNs payload as it is: a JSON object, or @FILE")
    p.add_argument("--fcm-raw", help="the FCM Message as it is (without token): a JSON object, or @FILE")
    p.add_argument("--push-type", default="alert", help="APNs push type (default alert)")
    p.add_argument("--priority", type=int, choices=[10, 5, 1], help="APNs priority")
    p.add_argument("--expiration", help="APNs: until when the provider may retry (ISO 8601)")
    p.add_argument("--collapse-id", help="APNs collapse id")
    p.add_argument("--data-only", action="store_true", help="FCM: a data message the app renders (adb_* keys)")
    p.add_argument("--fcm-priority", choices=["normal", "high"], help="FCM delivery priority")
    p.add_argument("--fcm-ttl-s", type=int, metavar="SECONDS", help="FCM: how long FCM keeps it")
    p.add_argument("--fcm-collapse-key", help="FCM collapse key")
    p.add_argument("--fcm-channel-id", help="Android notification channel")
    p.add_argument("--fcm-notification-priority", choices=["min", "low", "default", "high", "max"],
                   help="Android notification priority")
    p.add_argument("--fcm-visibility", choices=["private", "public", "secret"], help="Android lock-screen visibility")
    p.add_argument("--fcm-tag", help="Android: replaces a shown notification with the same tag")
    p.add_argument("--fcm-click-action", help="Android intent action on a tap (default: --category)")
    p.add_argument("--fcm-color", help="Android icon colour, #rrggbb")
    p.add_argument("--fcm-icon", help="Android drawable name")

    configs = group("configs", "channel configurations (where messages go)")
    p = sub(configs, "publish", "publish channel configurations from YAML or JSON files (a new version each)",
            _publisher(api.ChannelConfig, lambda c: api.PublishConfig(config=c), show_config))
    p.add_argument("files", nargs="+", metavar="FILE")
    p = sub(configs, "get", "show a channel configuration", _req(lambda a: api.GetConfig(name=a.name, version=a.version), show_config))
    p.add_argument("name")
    p.add_argument("--version", type=int)
    sub(configs, "list", "list channel configurations (latest versions)",
        _req(lambda a: api.ListConfigs(), lambda r: "\n".join(show_config(c) for c in r.configs) or "(no configurations)"))

    messages = group("messages", "push messages and their templates")
    p = sub(messages, "publish", "publish messages from YAML or JSON files (templates checked; a new version each)",
            _publisher(api.MessageSpec, lambda m: api.PublishMessage(message=m), show_message))
    p.add_argument("files", nargs="+", metavar="FILE")
    p = sub(messages, "get", "show a message", _req(lambda a: api.GetMessage(id=a.id, version=a.version),
                                                     lambda m: show_message(m) + "\n" + _json(m.message)))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    sub(messages, "list", "list messages (latest versions)",
        _req(lambda a: api.ListMessages(), lambda r: "\n".join(show_message(m) for m in r.messages) or "(no messages)"))
    p = sub(messages, "send", "send a published message now to profiles or an audience (a one-shot campaign)",
            _req(_send_request, show_send))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--identity", action="append", dest="identities", help="a profile (repeat for several)")
    target.add_argument("--audience", help="a condition over profile, e.g. \"profile.tier == 'gold'\"")
    p.add_argument("--test", action="store_true", help="only profiles whose attribute testProfile is true")
    p.add_argument("--event", help="data for templates that use event: a JSON object, or @FILE")
    p = sub(messages, "preview", "render a message for a profile and show the exact provider payloads",
            _req(_preview_request, show_preview))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    p.add_argument("--identity", help="a stored profile")
    p.add_argument("--profile", help="a sample profile's attributes: a JSON object, or @FILE")
    p.add_argument("--event", help="the triggering event's data: a JSON object, or @FILE")

    p = sub(commands, "reports", "what happened to notifications: targeted, excluded, sent, delivered, failed, opened",
            _reports)
    p.add_argument("--message", help="one message")
    p.add_argument("--version", type=int, help="one version of it")
    p.add_argument("--journey", help="one journey")
    p.add_argument("--node", help="one node of a journey")
    p.add_argument("--app")
    p.add_argument("--platform", choices=["apns", "apns-sandbox", "fcm"])
    p.add_argument("--live", action="store_true", help="the last 24 hours, by minute (default: all time)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="stay connected: the server sends the report again whenever its counts change, at most "
                        "every SECONDS (default 2); refreshed in place (with --json: one report per line) until interrupted")

    demo = commands.add_parser("demo", help="the whole flow in one command: mocks, apps, a message, a send, a report")
    demo.add_argument("--data", metavar="DIR", help="folder for the demo (default: a new temporary one)")
    demo.add_argument("--profiles", type=int, default=40, help="profiles to create (default 40, at least 1)")
    demo.set_defaults(action=None)

    for name, what in (("mock-apns", "APNs"), ("mock-fcm", "FCM")):
        mock = commands.add_parser(name, help=f"run the mock {what} (for tests, demos and benchmarks)", add_help=False)
        mock.add_argument("rest", nargs=argparse.REMAINDER)
        mock.set_defaults(action=None)

    events = group("events", "experience events")
    p = sub(events, "send", "send one event", _events_send)
    p.add_argument("identity")
    p.add_argument("type", help="event type, e.g. commerce.purchase")
    p.add_argument("--data", help="JSON object, or @FILE")
    p.add_argument("--ts", help="when it happened (ISO 8601; default now)")
    p = sub(events, "import", "ingest events from a JSON Lines file, in batches", _events_import)
    p.add_argument("file", help='JSON Lines, one {"identity","type","ts"?,"data"?} per line; - for stdin')
    p.add_argument("--batch-size", type=int, default=500)
    p = sub(events, "list", "list a profile's events", _events_list)
    p.add_argument("identity")
    p.add_argument("--type")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--reverse", action="store_true", help="newest first")
    return parser


class Unreachable(Exception):
    """The server could not be reached or is not a Pigeon server; printed as it is, exit status 1."""


async def _run_client(args: argparse.Namespace) -> None:
    try:
        parse_target(args.server)
    except ValueError as exc:
        raise UsageError(f"--server: {exc}") from None
    try:
        context = None if _plaintext(args) else ssl.create_default_context(cafile=args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca {args.ca}: cannot load it as a CA certificate: {getattr(exc, 'strerror', None) or exc}") from None
    connected = False
    try:
        # --timeout bounds connecting, and then each call (in the commands), not the whole command:
        # a long import or listing may take as long as it needs while the server keeps answering.
        with trio.CancelScope(deadline=trio.current_time() + args.timeout) as connecting:
            async with open_client(args.server, ssl_context=context, client_name="pigeon-cli") as client:
                connected = True
                connecting.deadline = math.inf
                await args.action(client, args)
        if connecting.cancelled_caught:
            raise trio.TooSlowError
    except (OSError, PigeonProtocolError, trio.TooSlowError) as exc:
        if connected:
            raise
        raise Unreachable(await _unreachable(args, exc)) from None


async def _unreachable(args: argparse.Namespace, exc: BaseException) -> str:
    """Why the server at ``args.server`` could not be talked to, with what to do about it."""
    server = args.server
    start = "start one with `pigeon serve`, or point --server (or PIGEON_SERVER) at yours"
    if isinstance(exc, OSError) and _refused(exc):
        return f"no server is listening at {server}: {start}"
    if isinstance(exc, NotPigeonServer):
        return _speaks_tls(server) if exc.speaks == "tls" else f"{server} is {exc}"  # "not a Pigeon server: ..."
    silent = isinstance(exc, trio.TooSlowError) or (isinstance(exc, ConnectionClosed) and exc.status is Status.UNAVAILABLE)
    if silent and _plaintext(args):
        # It took the connection but did not welcome us (a Pigeon server that refuses one says
        # why with another status): ask it in the protocols it may speak.
        host, port = parse_target(server)
        if host != "unix":
            speaks = await _probe(host, int(port))
            if speaks == "tls":
                return _speaks_tls(server)
            if speaks is not None:
                return f"{server} is not a Pigeon server: it answered in HTTP ({speaks})"
    if isinstance(exc, trio.TooSlowError):
        return f"no answer from {server} within {args.timeout:g}s"
    if isinstance(exc, OSError):
        return f"cannot connect to {server}: {exc}"
    return f"cannot talk to the server at {server}: {exc}"


def _plaintext(args: argparse.Namespace) -> bool:
    """Whether the client spoke without TLS (only then may the server be a TLS port)."""
    return not (args.tls or args.ca)


def _speaks_tls(server: str) -> str:
    return f"{server} speaks TLS: use --tls (and --ca FILE unless its certificate comes from a CA this system trusts)"


def _refused(exc: BaseException) -> bool:
    """Whether connecting failed because nothing listens there (trio reports the attempts of
    ``open_tcp_stream`` as the cause of one OSError)."""
    if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_refused(e) for e in exc.exceptions)
    return exc.__cause__ is not None and _refused(exc.__cause__)


#: How long each probe of a server that did not welcome us may take.
PROBE_S = 2.0


async def _probe(host: str, port: int) -> str | None:
    """What a server that took a connection but sent no welcome speaks: ``"tls"`` if it completes
    a TLS handshake, the first line of its answer if it answers an HTTP request, else None."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a question about the protocol, not about trust; nothing is sent
    with trio.move_on_after(PROBE_S):
        try:
            stream = trio.SSLStream(await trio.open_tcp_stream(host, port), context, server_hostname=host)
            try:
                await stream.do_handshake()
                return "tls"
            finally:
                await trio.aclose_forcefully(stream)
        except (OSError, trio.BrokenResourceError):
            pass
    with trio.move_on_after(PROBE_S):
        try:
            plain = await trio.open_tcp_stream(host, port)
            try:
                await plain.send_all(b"HEAD / HTTP/1.0\r\n\r\n")
                answer = b""
                while b"\n" not in answer and len(answer) < 1024:
                    data = await plain.receive_some(1024)
                    if not data:
                        break
                    answer += data
            finally:
                await trio.aclose_forcefully(plain)
        except (OSError, trio.BrokenResourceError):
            return None
        if answer.startswith(b"HTTP/"):
            return answer.splitlines()[0].decode("latin-1")
    return None


def _serve(args: argparse.Namespace) -> int:
    from server.runtime.app import serve

    overrides: dict[str, Any] = {}
    if args.data:
        overrides["data"] = args.data
    if args.listen:
        overrides["listen"] = args.listen
    if args.log_level:
        overrides["log_level"] = args.log_level
    config = load_config(args.config, env=os.environ, overrides=overrides)
    if args.ready_file and not Path(args.ready_file).absolute().parent.is_dir():
        raise UsageError(f"--ready-file {args.ready_file}: its folder does not exist")
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return trio.run(partial(serve, config, ready_file=args.ready_file))
    except BaseExceptionGroup as group:
        match, _ = group.split((RestartIntensityExceeded, ServerError))
        if match is None:
            raise
        first = match
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        log.critical("pigeon is exiting: %s", first)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock-apns"]:  # its own options, parsed by the mock
        from plugins.apns.mock import main as mock_main

        return mock_main(argv[1:])
    if argv[:1] == ["mock-fcm"]:
        from plugins.fcm.mock import main as fcm_mock_main

        return fcm_mock_main(argv[1:])
    args = _build_parser().parse_args(argv)
    if args.action is None and args.command not in ("serve", "demo"):
        args.group.print_help()  # bare `pigeon`, or a group without its subcommand
        return 2
    try:
        try:
            code = _run(args)
        except SystemExit as exc:  # a command's own status (push send: 1 unless all were sent)
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        return _output_closed()
    except BaseExceptionGroup as group:  # from inside a nursery (the demo's)
        if group.split(BrokenPipeError)[1] is not None:
            raise
        return _output_closed()


def _output_closed() -> int:
    """Whoever read our output has gone (`pigeon events list ... | head`): stop quietly, as Unix
    tools do, and point stdout at /dev/null so that the interpreter's last flush does not
    complain (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    """Run the command; errors become a line on stderr and an exit status (see the module's docstring)."""
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from server.cli.demo import run_demo

            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
            return trio.run(run_demo, args.data, args.profiles)
        trio.run(_run_client, args)
        return 0
    except (UsageError, ConfigError) as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 1
    except CallError as exc:
        print(f"pigeon: {_call_error_text(exc, args)}", file=sys.stderr)
        return 2 if exc.status is Status.INVALID_ARGUMENT else 1
    except Unreachable as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except (PigeonProtocolError, OSError) as exc:
        print(f"pigeon: cannot talk to the server at {getattr(args, 'server', '?')}: {exc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"pigeon: no answer from {args.server} within {args.timeout:g}s", file=sys.stderr)
        return 1


def _call_error_text(exc: CallError, args: argparse.Namespace) -> str:
    """The server's error; when it is about a field that came from a flag, it names the flag
    and its value (``--p8 AuthKey.p8: ...``) instead of the request's field (``$.auth.key_pem``)."""
    field = exc.field or ""
    for prefix, dest in getattr(args, "flags", {}).items():
        value = getattr(args, dest, None)
        if value is None or not (field == prefix or field.startswith((prefix + ".", prefix + "["))):
            continue
        flag = "--" + dest.replace("_", "-")
        if len(value) <= 200 and "\n" not in value:  # a file name, an id; not a whole JSON document
            flag += f" {value}"
        inner = field[len(prefix):].lstrip(".")
        return f"{flag}: " + (f"{inner}: " if inner else "") + exc.message.removeprefix(f"{field}: ")
    return f"{exc.status}: {exc.message}"

