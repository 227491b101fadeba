"""The ``pigeon`` argument tree: its commands, their options and help texts.

`build_parser` builds it with one function per command group (``profiles``, ``apps``, ...), in
the order ``pigeon --help`` lists them. A client command's parsed arguments carry the `Action`
to run once connected (``args.action``); ``serve``, ``demo`` and the mocks have none.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from protocols import api
from protocols.frames import PROTOCOL_VERSION

from server.cli import commands
from server.cli.commands import Action, call_action, publish_action
from server.cli.inputs import parse_json_object
from server.cli.output import (
    show_app, show_app_deleted, show_apps, show_config, show_configs, show_consent, show_health, show_message,
    show_message_document, show_messages, show_preview, show_profile, show_profile_deleted, show_send, show_stats,
    show_token_registered, show_token_unregistered, show_created_key, show_keys, show_key_revoked,
    show_secrets_rotated, show_sandbox, show_sandboxes, show_journey, show_journey_document, show_journeys,
    show_simulation,
)
from server.runtime.config import DEFAULT_LISTEN

__all__ = ["COMMANDS", "build_parser", "client_options"]

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
    "keys.create": "keys create",
    "keys.list": "keys list",
    "keys.revoke": "keys revoke",
    "sandboxes.create": "sandboxes create",
    "sandboxes.list": "sandboxes list",
    "journeys.publish": "journeys publish",
    "journeys.get": "journeys get",
    "journeys.list": "journeys list",
    "journeys.close": "journeys close",
    "journeys.stop": "journeys stop",
    "journeys.pause": "journeys pause",
    "journeys.resume": "journeys resume",
    "journeys.simulate": "journeys simulate",
    "journeys.trace": "journeys trace",
    "secrets.rotate": "secrets rotate",
    "reports.watch": "reports --watch",
}

#: The subcommands of a parser (what ``add_subparsers`` returns).
Subcommands = argparse._SubParsersAction  # typeshed's name; argparse has no public one


def client_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
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
    parser.add_argument("--api-key", metavar="KEY", default=default(None),
                        help="API key (env PIGEON_API_KEY; default: the admin key of the server configured "
                             "on this machine, or named by a server on this machine)")
    parser.add_argument("--sandbox", metavar="NAME", default=default(None),
                        help="the sandbox to work in (env PIGEON_SANDBOX; default: the API key's, which is the "
                             "only one it may name; without keys: default)")


class _Tree:
    """The commands of the parser being built, and the client options each client command takes."""

    def __init__(self, commands: Subcommands[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
        self.commands = commands
        self.common = common

    def group(self, name: str, help: str) -> Subcommands[argparse.ArgumentParser]:
        """A command group (``profiles``, ``apps``, ...); without a subcommand it prints its help."""
        p = self.commands.add_parser(name, help=help)
        p.set_defaults(group=p)
        return p.add_subparsers(dest="sub", metavar="SUBCOMMAND")

    def command(self, parent: Subcommands[argparse.ArgumentParser], name: str, help: str, action: Action,
                flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
        """A client command. ``flags`` maps the request fields that come from a flag (``$.auth.key_pem``)
        to the flag's dest (``p8``), so that the server's error about the field names the flag."""
        p = parent.add_parser(name, help=help, parents=[self.common])
        p.set_defaults(action=action, flags=flags or {})
        return p


def build_parser() -> argparse.ArgumentParser:
    """The whole ``pigeon`` argument tree."""
    from server.runtime.app import VERSION

    common = argparse.ArgumentParser(add_help=False)
    client_options(common, defaults=False)

    parser = argparse.ArgumentParser(
        prog="pigeon", description="Pigeon, a self-hosted push journey server.",
        epilog="Options of the client commands (--server, --json, --tls, --ca, --timeout, --api-key, --sandbox) may also come after "
               "the command. `pigeon COMMAND --help` shows a command's own options.")
    parser.add_argument("--version", action="version", version=f"pigeon {VERSION} (protocol {PROTOCOL_VERSION})")
    client_options(parser, defaults=True)
    parser.set_defaults(action=None, group=parser)
    tree = _Tree(parser.add_subparsers(dest="command", metavar="COMMAND"), common)
    for add_commands in (_serve, _server, _profiles, _tokens, _consent, _apps, _push, _configs, _messages, _reports,
                         _journeys, _keys, _sandboxes, _secrets, _demo, _mocks, _events):
        add_commands(tree)
    return parser


def _serve(tree: _Tree) -> None:
    serve = tree.commands.add_parser("serve", help="run the server")
    serve.add_argument("--data", metavar="DIR", help="data folder (default ./pigeon-data)")
    serve.add_argument("--listen", metavar="ADDR", action="append",
                       help="HOST:PORT or unix:PATH to listen on; repeat for several (default 127.0.0.1:7600)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (default ./pigeon.toml if present)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ready-file", metavar="PATH",
                       help="once listening, write the addresses listened on to PATH (one a line, the port "
                            "chosen for :0 included); removed when the server stops")
    serve.set_defaults(action=None)


def _server(tree: _Tree) -> None:
    tree.command(tree.commands, "health", "is the server serving?", call_action(lambda a: api.GetHealth(), show_health))
    tree.command(tree.commands, "stats", "actors, connections, store and per-method latency",
                 call_action(lambda a: api.GetStats(), show_stats))


def _profiles(tree: _Tree) -> None:
    profiles = tree.group("profiles", "customer profiles")
    p = tree.command(profiles, "get", "show a profile", call_action(lambda a: api.GetProfile(identity=a.identity), show_profile))
    p.add_argument("identity", help="namespace:value, e.g. crm:42")
    p = tree.command(profiles, "upsert", "create a profile or replace its attributes", call_action(
        lambda a: api.UpsertProfile(identity=a.identity, attributes=parse_json_object(a.attributes, "attributes")), show_profile))
    p.add_argument("identity")
    p.add_argument("attributes", nargs="?", default="{}", help="JSON object, or @FILE, or @- for stdin")
    p = tree.command(profiles, "patch", "merge-patch a profile's attributes (null deletes a key)", call_action(
        lambda a: api.PatchProfile(identity=a.identity, patch=parse_json_object(a.patch, "patch"), create=not a.no_create),
        show_profile))
    p.add_argument("identity")
    p.add_argument("patch", help="JSON object, or @FILE, or @- for stdin")
    p.add_argument("--no-create", action="store_true", help="fail if no profile has this identity")
    p = tree.command(profiles, "delete", "delete a profile and every trace of it",
                     call_action(lambda a: api.DeleteProfile(identity=a.identity), show_profile_deleted))
    p.add_argument("identity")
    p = tree.command(profiles, "link", "add an identity to a profile",
                     call_action(lambda a: api.LinkIdentity(identity=a.identity, link=a.link), show_profile))
    p.add_argument("identity")
    p.add_argument("link", help="the identity to add")
    p = tree.command(profiles, "unlink", "remove an identity from its profile",
                     call_action(lambda a: api.UnlinkIdentity(identity=a.identity), show_profile))
    p.add_argument("identity")


def _tokens(tree: _Tree) -> None:
    tokens = tree.group("tokens", "push tokens")
    p = tree.command(tokens, "register", "register a push token on a profile", call_action(
        lambda a: api.RegisterToken(identity=a.identity, app=a.app, platform=a.platform, token=a.token), show_token_registered))
    p.add_argument("identity")
    p.add_argument("--app", required=True, help="bundle id or package name")
    p.add_argument("--platform", required=True, choices=["apns", "apns-sandbox", "fcm"])
    p.add_argument("--token", required=True)
    p = tree.command(tokens, "unregister", "remove a push token",
                     call_action(lambda a: api.UnregisterToken(app=a.app, token=a.token), show_token_unregistered))
    p.add_argument("--app", required=True)
    p.add_argument("--token", required=True)


def _consent(tree: _Tree) -> None:
    consent = tree.group("consent", "push consent")
    p = tree.command(consent, "set", "opt a profile in or out of an app's push",
                     call_action(lambda a: api.SetConsent(identity=a.identity, app=a.app, push=a.push), show_consent))
    p.add_argument("identity")
    p.add_argument("--app", required=True)
    p.add_argument("--push", required=True, choices=["in", "out"])


def _apps(tree: _Tree) -> None:
    apps = tree.group("apps", "apps and their provider credentials")
    p = tree.command(apps, "register-ios", "register an app's APNs credentials (checked now, never shown again)",
                     call_action(commands.register_ios, show_app),
                     flags={"$.auth.key_pem": "p8", "$.auth.key_id": "key_id", "$.auth.team_id": "team_id",
                            "$.auth.pkcs12": "p12", "$.auth.pem": "pem", "$.auth.password": "password_env",
                            "$.bundle_id": "bundle_id"})
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
    p = tree.command(apps, "register-android", "register an app's FCM service account (checked now, never shown again)",
                     call_action(commands.register_android, show_app),
                     flags={"$.service_account": "service_account", "$.package_name": "package_name"})
    p.add_argument("app", help="the app id (usually the package name)")
    p.add_argument("--service-account", required=True, metavar="FILE",
                   help="the Firebase service account's JSON key file")
    p.add_argument("--package-name", help="the Android package name, if not the app id")
    p = tree.command(apps, "get", "show an app (without its secrets)", call_action(lambda a: api.GetApp(app=a.app), show_app))
    p.add_argument("app")
    tree.command(apps, "list", "list the registered apps", call_action(lambda a: api.ListApps(), show_apps))
    p = tree.command(apps, "delete", "forget an app and its credentials",
                     call_action(lambda a: api.DeleteApp(app=a.app), show_app_deleted))
    p.add_argument("app")


def _push(tree: _Tree) -> None:
    push = tree.group("push", "send push notifications")
    p = tree.command(push, "send", "send one notification now (transactional: no consent or capping rules)",
                     commands.push_send, flags={"$.raw": "raw", "$.fcm_raw": "fcm_raw", "$.content.data": "data"})
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
    _fcm_push_options(p)


def _fcm_push_options(p: argparse.ArgumentParser) -> None:
    """``push send``'s options for FCM."""
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


def _configs(tree: _Tree) -> None:
    configs = tree.group("configs", "channel configurations (where messages go)")
    p = tree.command(configs, "publish", "publish channel configurations from YAML or JSON files (a new version each)",
                     publish_action(api.ChannelConfig, lambda c: api.PublishConfig(config=c), show_config))
    p.add_argument("files", nargs="+", metavar="FILE")
    p = tree.command(configs, "get", "show a channel configuration",
                     call_action(lambda a: api.GetConfig(name=a.name, version=a.version), show_config))
    p.add_argument("name")
    p.add_argument("--version", type=int)
    tree.command(configs, "list", "list channel configurations (latest versions)",
                 call_action(lambda a: api.ListConfigs(), show_configs))


def _messages(tree: _Tree) -> None:
    messages = tree.group("messages", "push messages and their templates")
    p = tree.command(messages, "publish", "publish messages from YAML or JSON files (templates checked; a new version each)",
                     publish_action(api.MessageSpec, lambda m: api.PublishMessage(message=m), show_message))
    p.add_argument("files", nargs="+", metavar="FILE")
    p = tree.command(messages, "get", "show a message",
                     call_action(lambda a: api.GetMessage(id=a.id, version=a.version), show_message_document))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    tree.command(messages, "list", "list messages (latest versions)", call_action(lambda a: api.ListMessages(), show_messages))
    p = tree.command(messages, "send", "send a published message now to profiles or an audience (a one-shot campaign)",
                     call_action(commands.send_request, show_send))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--identity", action="append", dest="identities", help="a profile (repeat for several)")
    target.add_argument("--audience", help="a condition over profile, e.g. \"profile.tier == 'gold'\"")
    p.add_argument("--test", action="store_true", help="only profiles whose attribute testProfile is true")
    p.add_argument("--event", help="data for templates that use event: a JSON object, or @FILE")
    p = tree.command(messages, "preview", "render a message for a profile and show the exact provider payloads",
                     call_action(commands.preview_request, show_preview))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    p.add_argument("--identity", help="a stored profile")
    p.add_argument("--profile", help="a sample profile's attributes: a JSON object, or @FILE")
    p.add_argument("--event", help="the triggering event's data: a JSON object, or @FILE")


def _reports(tree: _Tree) -> None:
    p = tree.command(tree.commands, "reports",
                     "what happened to notifications: targeted, excluded, sent, delivered, failed, opened", commands.reports)
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


def _keys(tree: _Tree) -> None:
    keys = tree.group("keys", "API keys and their scopes (admin)")
    p = tree.command(keys, "create", "make an API key (shown once)", call_action(
        lambda a: api.CreateKey(scopes=a.scopes, name=a.name, sandbox=a.into), show_created_key))
    p.add_argument("scopes", nargs="+", choices=list(api.SCOPES),
                   help="admin (everything), operator (profiles, sends, reports; implies ingest and read), "
                        "ingest (tokens, consent, events: the key an app embeds), read (reports, stats)")
    p.add_argument("--name", default="", help="a label for the list, e.g. ios-app")
    p.add_argument("--in", dest="into", metavar="SANDBOX",
                   help="make the key in this sandbox (default: the caller's; another needs an admin key of default)")
    p = tree.command(keys, "list", "list the API keys of a sandbox (never the keys themselves)",
                     call_action(lambda a: api.ListKeys(sandbox=a.into), show_keys))
    p.add_argument("--in", dest="into", metavar="SANDBOX",
                   help="list this sandbox's keys (default: the caller's; another needs an admin key of default)")
    p = tree.command(keys, "revoke", "revoke an API key and close its connections",
                     call_action(lambda a: api.RevokeKey(id=a.id), show_key_revoked))
    p.add_argument("id", help="the key's id (its first 12 characters, as listed)")


def _journeys(tree: _Tree) -> None:
    journeys = tree.group("journeys", "journeys: entries, waits, conditions, pushes, reactions (admin)")
    p = tree.command(journeys, "publish", "publish journeys from YAML or JSON files (checked whole; a new version each)",
                     publish_action(api.JourneySpec, lambda j: api.PublishJourney(journey=j), show_journey))
    p.add_argument("files", nargs="+", metavar="FILE")
    p = tree.command(journeys, "get", "show a journey (its message versions pinned)",
                     call_action(lambda a: api.GetJourney(id=a.id, version=a.version), show_journey_document))
    p.add_argument("id")
    p.add_argument("--version", type=int)
    tree.command(journeys, "list", "list journeys (latest versions) and their states",
                 call_action(lambda a: api.ListJourneys(), show_journeys))
    p = tree.command(journeys, "trace", "a test-mode journey's instance for a profile: where it is, every step",
                     call_action(lambda a: api.TraceJourney(id=a.id, identity=a.identity), show_simulation))
    p.add_argument("id")
    p.add_argument("identity")
    p = tree.command(journeys, "report", "a journey's counts node by node: entered, exited (why), pushes and their "
                     "outcomes, opens, goals", commands.journey_report)
    p.add_argument("id")
    p.add_argument("--version", type=int, help="that version's nodes, counts and waiting instances (default: the "
                   "latest version's nodes, every version's counts)")
    p.add_argument("--live", action="store_true", help="the last 24 hours (default: all time)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="print it again every SECONDS (default 2) until interrupted")
    p = tree.command(journeys, "simulate", "run a journey for one profile on a virtual clock: each step, each "
                     "rendered push, each exclusion, where it ends (nothing sent or written)",
                     call_action(commands.simulate_request, show_simulation))
    p.add_argument("journey", metavar="FILE|ID", help="a journey file (.yaml, .yml, .json), or a published journey's id")
    p.add_argument("--version", type=int, help="with an id: that version (default: the latest)")
    p.add_argument("--identity", help="a stored profile")
    p.add_argument("--profile", help="a sample profile: a JSON object (attributes, and identities, registrations "
                                     "[{app, platform, token}], consent {app: in|out}), or @FILE")
    p.add_argument("--events", metavar="FILE.jsonl", help="the profile's events, one JSON object a line: "
                                                          '{"at": "2026-12-08T09:00:00Z", "type": "app.installed", "data": {}}')
    p.add_argument("--start", help="when the virtual clock starts (RFC 3339; default: the first event, or now)")
    p.add_argument("--until", help="when it stops (default: 120 days after the start)")
    for verb, request, help in (
        ("close", api.CloseJourney, "take no new entries; instances run to their end"),
        ("stop", api.StopJourney, "every instance exits now; no new entries"),
        ("pause", api.PauseJourney, "hold timers and entries until resumed"),
        ("resume", api.ResumeJourney, "run a paused journey again"),
    ):
        p = tree.command(journeys, verb, help, call_action(_naming(request), show_journey))
        p.add_argument("id")


def _naming(request: Callable[..., api.Request[api.JourneyInfo]]) -> Callable[[argparse.Namespace], api.Request[api.JourneyInfo]]:
    """The request of a lifecycle command: its journey id."""
    return lambda a: request(id=a.id)


def _sandboxes(tree: _Tree) -> None:
    sandboxes = tree.group("sandboxes", "separate worlds of apps, profiles, messages and reports (admin of default)")
    p = tree.command(sandboxes, "create", "make a sandbox (then: pigeon keys create admin --in NAME)",
                     call_action(lambda a: api.CreateSandbox(name=a.name), show_sandbox))
    p.add_argument("name", help="lower case letters, digits and dashes, e.g. dev")
    tree.command(sandboxes, "list", "list the sandboxes", call_action(lambda a: api.ListSandboxes(), show_sandboxes))


def _secrets(tree: _Tree) -> None:
    secrets = tree.group("secrets", "the master key that seals the stored credentials (admin)")
    tree.command(secrets, "rotate", "re-encrypt every stored secret under a new master key, without stopping",
                 call_action(lambda a: api.RotateSecrets(), show_secrets_rotated))


def _demo(tree: _Tree) -> None:
    demo = tree.commands.add_parser("demo", help="the whole flow in one command: mocks, apps, a message, a send, a report")
    demo.add_argument("--data", metavar="DIR", help="folder for the demo (default: a new temporary one)")
    demo.add_argument("--profiles", type=int, default=40, help="profiles to create (default 40, at least 1)")
    demo.set_defaults(action=None)


def _mocks(tree: _Tree) -> None:
    """``mock-apns`` and ``mock-fcm``: listed here for the help; `server.cli.main.main` hands their
    arguments to the mocks' own parsers before this tree sees them."""
    for name, what in (("mock-apns", "APNs"), ("mock-fcm", "FCM")):
        mock = tree.commands.add_parser(name, help=f"run the mock {what} (for tests, demos and benchmarks)", add_help=False)
        mock.add_argument("rest", nargs=argparse.REMAINDER)
        mock.set_defaults(action=None)


def _events(tree: _Tree) -> None:
    events = tree.group("events", "experience events")
    p = tree.command(events, "send", "send one event", commands.events_send)
    p.add_argument("identity")
    p.add_argument("type", help="event type, e.g. commerce.purchase")
    p.add_argument("--data", help="JSON object, or @FILE")
    p.add_argument("--ts", help="when it happened (ISO 8601; default now)")
    p = tree.command(events, "import", "ingest events from a JSON Lines file, in batches", commands.events_import)
    p.add_argument("file", help='JSON Lines, one {"identity","type","ts"?,"data"?} per line; - for stdin')
    p.add_argument("--batch-size", type=int, default=500)
    p = tree.command(events, "list", "list a profile's events", commands.events_list)
    p.add_argument("identity")
    p.add_argument("--type")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--reverse", action="store_true", help="newest first")
