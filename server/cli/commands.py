"""The client commands: what each one asks the server and how it prints the answer.

An `Action` takes the connected client and the parsed arguments. Most commands are one call
and one summary (`call_action`); the others (importing events, listing them, a push, reports,
publishing files) have an action of their own here. ``--timeout`` bounds each call, not the
whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
import trio

from protocols import api
from protocols.errors import CallError
from protocols.trio_client import BatchFailed, Client, EventBatcher

from server.cli.inputs import TOO_DEEP, UsageError, load_document, make_event, parse_json_object, parse_time, read_file
from server.cli.output import json_line, show_event, show_ingest, show_journey_report, show_push, show_report, to_json

__all__ = [
    "Action", "call_action", "events_import", "events_list", "events_send", "preview_request", "publish_action",
    "push_send", "register_android", "register_ios", "reports", "send_request",
]

R = TypeVar("R")
D = TypeVar("D")

#: A client command: what it does once connected.
Action = Callable[[Client, argparse.Namespace], Awaitable[None]]


def call_action(build: Callable[[argparse.Namespace], api.Request[R]], show: Callable[[R], str] | None) -> Action:
    """The command that makes one request from the arguments and prints the response
    (``show``'s summary, or JSON with ``--json`` or when there is no ``show``)."""

    async def action(client: Client, args: argparse.Namespace) -> None:
        request = build(args)
        with trio.fail_after(args.timeout):
            result = await client.call(request)
        print(to_json(result) if args.json or show is None else show(result))

    return action


def publish_action(kind: type[D], request: Callable[[D], api.Request[R]], show: Callable[[R], str]) -> Action:
    """The command that publishes each file of ``args.files``, read as a ``kind``; errors name the file."""

    async def action(client: Client, args: argparse.Namespace) -> None:
        for path in args.files:
            document = load_document(path, kind)
            try:
                with trio.fail_after(args.timeout):
                    result = await client.call(request(document))
            except CallError as exc:
                raise CallError(exc.status, f"{path}: {exc.message}", field=exc.field) from None
            print(to_json(result) if args.json else f"{path}: {show(result)}")

    return action


# ---------------------------------------------------------------------------------------------
# events


async def events_send(client: Client, args: argparse.Namespace) -> None:
    data = parse_json_object(args.data, "--data") if args.data else {}
    event = make_event(args.identity, args.type, data, parse_time(args.ts, "--ts"))
    with trio.fail_after(args.timeout):
        result = await client.call(api.IngestEvents(events=[event]))
    print(to_json(result) if args.json else show_ingest(result))
    if result.rejected:
        raise SystemExit(1)


async def events_import(client: Client, args: argparse.Namespace) -> None:
    try:
        source = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc.strerror}") from None
    decoder = msgspec.json.Decoder(api.Event)
    invalid: list[str] = []
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
    _print_import(args.json, lines, batcher, invalid, stopped)
    if invalid or batcher.rejected or stopped:
        raise SystemExit(1)


def _print_import(as_json: bool, lines: int, batcher: EventBatcher, invalid: list[str], stopped: BatchFailed | None) -> None:
    """What `events_import` did: lines read, events accepted, lines invalid, events the server
    rejected or did not acknowledge (a batch that failed)."""
    rejected = [r.message for _, r in batcher.rejected]
    not_acknowledged = sum(len(f.events) for f in batcher.failed)
    if as_json:
        summary = {"lines": lines, "accepted": batcher.accepted, "invalid": invalid, "rejected": rejected,
                   "not_acknowledged": not_acknowledged}
        print(json.dumps(summary, indent=2))
    else:
        print(f"{lines} line(s): {batcher.accepted} event(s) accepted, {len(invalid)} invalid, {len(batcher.rejected)} rejected"
              + (f", {not_acknowledged} not acknowledged" if stopped else ""))
        for problem in invalid + rejected:
            print(f"  {problem}")
    if stopped is not None:
        print(f"pigeon: some batches failed: {stopped.error}", file=sys.stderr)


async def events_list(client: Client, args: argparse.Namespace) -> None:
    request = api.ListEvents(
        identity=args.identity,
        type=args.type,
        since=parse_time(args.since, "--since"),
        until=parse_time(args.until, "--until"),
        limit=args.limit,
        reverse=args.reverse,
    )
    count = 0
    async with client.stream(request) as events:
        async for event in events:
            count += 1
            print(json_line(event) if args.json else show_event(event))
    if not args.json and count == 0:
        print("(no events)")


# ---------------------------------------------------------------------------------------------
# apps


def register_ios(args: argparse.Namespace) -> api.RegisterIosApp:
    password = os.environ.get(args.password_env) if args.password_env else None
    chosen = [name for name in ("p8", "p12", "pem") if getattr(args, name)]
    if len(chosen) != 1:
        raise UsageError("give one of --p8 (token auth), --p12 or --pem (certificate auth)")
    auth: api.ApnsTokenAuth | api.ApnsCertificateAuth
    if args.p8:
        if not (args.key_id and args.team_id):
            raise UsageError("--p8 needs --key-id and --team-id")
        auth = api.ApnsTokenAuth(key_pem=read_file(args.p8, "the .p8 key"), key_id=args.key_id, team_id=args.team_id)
    elif args.p12:
        auth = api.ApnsCertificateAuth(pkcs12=read_file(args.p12, "the .p12 file", binary=True), password=password)
    else:
        auth = api.ApnsCertificateAuth(pem=read_file(args.pem, "the PEM file"), password=password)
    return api.RegisterIosApp(app=args.app, bundle_id=args.bundle_id, environment=args.environment, auth=auth)


def register_android(args: argparse.Namespace) -> api.RegisterAndroidApp:
    text = read_file(args.service_account, "the service account key file")
    try:
        account = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the service account key file {args.service_account!r} is not JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"the service account key file {args.service_account!r} is {TOO_DEEP}") from None
    if not isinstance(account, dict):
        raise UsageError(f"the service account key file {args.service_account!r} does not hold a JSON object")
    return api.RegisterAndroidApp(app=args.app, package_name=args.package_name, service_account=account)


# ---------------------------------------------------------------------------------------------
# push


def push_request(args: argparse.Namespace) -> api.SendPush:
    fcm_raw = parse_json_object(args.fcm_raw, "--fcm-raw") if args.fcm_raw else None
    if args.raw or fcm_raw is not None:
        raw = parse_json_object(args.raw, "--raw") if args.raw else None
        content = None
    else:
        raw = None
        content = _push_content(args)
    try:
        apns = msgspec.convert(_apns_options(args), api.ApnsOptions)
        fcm_options = msgspec.convert(_fcm_options(args), api.FcmOptions)
    except msgspec.ValidationError as exc:
        raise UsageError(api.describe_validation_error(exc)[0]) from None
    return api.SendPush(
        app=args.app, token=args.token, platform=args.platform, identity=args.identity, content=content, raw=raw,
        fcm_raw=fcm_raw, apns=apns, fcm=fcm_options,
    )


def _push_content(args: argparse.Namespace) -> api.PushContent:
    fields = {
        name: getattr(args, name)
        for name in ("title", "subtitle", "body", "badge", "sound", "category", "thread_id", "media_url",
                     "deeplink", "interruption_level")
        if getattr(args, name) is not None
    }
    if args.data:
        fields["data"] = parse_json_object(args.data, "--data")
    if args.content_available:
        fields["content_available"] = True
    if args.mutable_content:
        fields["mutable_content"] = True
    return api.PushContent(**fields)


def _apns_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"push_type": args.push_type}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.expiration is not None:
        options["expiration"] = parse_time(args.expiration, "--expiration")
    if args.collapse_id is not None:
        options["collapse_id"] = args.collapse_id
    return options


def _fcm_options(args: argparse.Namespace) -> dict[str, Any]:
    fcm: dict[str, Any] = {}
    for name in ("priority", "ttl_s", "collapse_key", "channel_id", "notification_priority", "visibility", "tag",
                 "click_action", "color", "icon"):
        value = getattr(args, f"fcm_{name}")
        if value is not None:
            fcm[name] = value
    if args.data_only:
        fcm["data_only"] = True
    return fcm


async def push_send(client: Client, args: argparse.Namespace) -> None:
    request = push_request(args)
    with trio.fail_after(args.timeout):
        result = await client.call(request)
    print(to_json(result) if args.json else show_push(result))
    if result.excluded or any(o.status != "sent" for o in result.outcomes):
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# messages and reports


def send_request(args: argparse.Namespace) -> api.SendMessage:
    return api.SendMessage(
        id=args.id, version=args.version, identities=args.identities or [], audience=args.audience, test=args.test,
        event=parse_json_object(args.event, "--event") if args.event else {},
    )


def preview_request(args: argparse.Namespace) -> api.PreviewMessage:
    if (args.identity is None) == (args.profile is None):
        raise UsageError("give --identity or --profile")
    return api.PreviewMessage(
        id=args.id, version=args.version, identity=args.identity,
        profile=parse_json_object(args.profile, "--profile") if args.profile else None,
        event=parse_json_object(args.event, "--event") if args.event else {},
    )


def simulate_request(args: argparse.Namespace) -> api.SimulateJourney:
    """``journeys simulate``: a journey file (or a published journey's id), a profile, events."""
    if (args.identity is None) == (args.profile is None):
        raise UsageError("give --identity or --profile")
    where = Path(args.journey)
    spec = load_document(args.journey, api.JourneySpec) if where.suffix in (".yaml", ".yml", ".json") else None
    events = []
    if args.events:
        decoder = msgspec.json.Decoder(api.SimulatedEvent)
        for n, line in enumerate(read_file(args.events, "--events").splitlines(), 1):
            if line.strip():
                try:
                    events.append(decoder.decode(line))
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    raise UsageError(f"{args.events}, line {n}: {exc}") from None
    return api.SimulateJourney(
        journey=spec, id=None if spec is not None else args.journey, version=args.version, identity=args.identity,
        profile=parse_json_object(args.profile, "--profile") if args.profile else None,
        events=events, start=parse_time(args.start, "--start"), until=parse_time(args.until, "--until"),
    )


async def journey_report(client: Client, args: argparse.Namespace) -> None:
    """``journeys report``: a journey's counts node by node, once or whenever they change."""
    window: Literal["live", "all_time"] = "live" if args.live else "all_time"
    while True:
        with trio.fail_after(args.timeout):
            info = await client.call(api.GetJourney(id=args.id, version=args.version))  # its waiting instances now
            rows = [(node, await client.call(api.GetReport(journey=args.id, node=node.id, window=window,
                                                           journey_version=args.version)))
                    for node in info.journey.nodes]
        print(to_json({n.id: r for n, r in rows}) if args.json else show_journey_report(info, rows), flush=True)
        if args.watch is None:
            return
        await trio.sleep(args.watch)
        print("\x1b[H\x1b[2J", end="")


async def reports(client: Client, args: argparse.Namespace) -> None:
    filters = {"message": args.message, "version": args.version, "journey": args.journey, "node": args.node,
               "app": args.app, "platform": args.platform, "window": "live" if args.live else "all_time"}
    if args.watch is None:
        with trio.fail_after(args.timeout):
            result = await client.call(api.GetReport(**filters))
        print(to_json(result) if args.json else show_report(result))
        return
    # The server streams a report whenever the counts change; until interrupted.
    async with client.stream(api.WatchReport(**filters, interval_s=args.watch)) as watched:
        async for result in watched:
            if args.json:
                print(json_line(result), flush=True)  # one report per line
            else:
                print("\x1b[H\x1b[2J" + show_report(result), flush=True)  # refresh in place
