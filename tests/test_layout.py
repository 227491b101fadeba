"""The shape of the code: the public surface, the domains' methods, imports, sizes.

Plugin authors and clients import `server`, `server.hookspecs`, `server.channels`,
`server.templates`, `server.testing` and `protocols.*`: what those publish is pinned here, so a
change to it is deliberate. The rest of the server is laid out by the push data flow (README,
"Layout"): each domain registers its own protocol methods, no module imports itself back
through others, and modules and functions stay short enough to read in one sitting.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from protocols import api

ROOT = Path(__file__).resolve().parent.parent
#: Lines a module may have without a reason at its top (a docstring paragraph starting
#: ``Why one module``).
MODULE_LINES = 600
#: Lines a function may have, in the server, the protocols and the plugins.
FUNCTION_LINES = 80

SURFACE = {
    'server': {
        'Actor', 'ActorCrashed', 'ActorError', 'AlreadyExists', 'ChildSpec', 'Config', 'ConfigError',
        'FailedPrecondition', 'Future', 'InvalidArgument', 'MailboxClosed', 'NotFound', 'Plugins',
        'ResourceExhausted', 'Restart', 'RestartIntensityExceeded', 'SchemaError', 'Server', 'ServerError',
        'StorageError', 'Supervisor', 'SupervisorOptions', 'VERSION', 'hookimpl', 'load_config', 'serve'
    },
    'server.hookspecs': {
        'hookimpl', 'hookspec', 'pigeon_channels', 'pigeon_exclude'
    },
    'server.channels': {
        'AndroidRecord', 'AppRecord', 'AppVersions', 'Channel', 'CredentialsError', 'DeliveryJob',
        'DeliveryResult', 'IosRecord', 'Rendered', 'json_problem'
    },
    'server.templates': {
        'Condition', 'Field', 'MAX_INT_BITS', 'MAX_ITERATIONS', 'MAX_MADE', 'MAX_OUTPUT', 'MAX_SECONDS',
        'MAX_SOURCE', 'MAX_VALUE', 'MissingValue', 'Scope', 'TemplateError', 'TemplateLimit', 'TemplateSyntax',
        'compile_condition', 'compile_field'
    },
    'server.testing': {
        'ServerProcess'
    },
    'protocols': {
        'CallError', 'ClientConnection', 'ConnectionClosed', 'FrameDecoder', 'FrameEncoder', 'FrameTooLarge',
        'HandshakeError', 'MalformedFrame', 'PROTOCOL_VERSION', 'PigeonProtocolError', 'ProtocolError',
        'ServerConnection', 'Status', 'api'
    },
    'protocols.api': {
        'ActorStats', 'AndroidAppInfo', 'AndroidFields', 'AndroidNotificationPriority', 'ApnsCertificateAuth',
        'ApnsEnvironment', 'ApnsOptions', 'ApnsPushType', 'ApnsTokenAuth', 'AppDeleted', 'AppId', 'AppInfo',
        'AppList', 'AppleId', 'Button', 'ChannelConfig', 'ConfigInfo', 'ConfigList', 'ConnectionStats',
        'ConsentEntry', 'CriticalSound', 'DeleteApp', 'DeleteProfile', 'Event', 'EventType', 'EVENT_ID_PATTERN',
        'EventId', 'FcmOptions',
        'GetApp', 'GetConfig', 'GetHealth', 'GetMessage', 'GetProfile', 'GetReport', 'GetStats', 'Health',
        'IDENTITY_PATTERN', 'Identity', 'IngestEvents', 'IngestResult', 'IosAppInfo', 'IosFields',
        'LinkIdentity', 'ListApps', 'ListConfigs', 'ListEvents', 'ListMessages', 'LiveActivity',
        'MAX_EVENTS_PER_BATCH', 'MAX_TEXT', 'METHODS', 'MessageContent', 'MessageInfo', 'MessageList',
        'MessageSpec', 'MethodSpec', 'MethodStats', 'MinuteCounts', 'NAME_PATTERN', 'Name', 'OnClick',
        'PatchProfile', 'Platform', 'PlatformPreview', 'Preview', 'PreviewMessage', 'ProcessStats', 'Profile',
        'ProfileDeleted', 'PublishConfig', 'PublishMessage', 'PushContent', 'PushOutcome', 'PushSent',
        'PushToken', 'RegisterAndroidApp', 'RegisterIosApp', 'RegisterToken', 'Registration', 'Rejection',
        'Report', 'Request', 'SendMessage', 'SendPush', 'SendResult', 'SetConsent', 'Stats', 'StoreStats',
        'StoredEvent', 'StreamRequest', 'Timestamp', 'TokenRegistered', 'TokenUnregistered', 'UnlinkIdentity',
        'UnregisterToken', 'UpsertProfile', 'WatchReport', 'describe_validation_error',
        'KEY_PATTERN', 'KEY_ID_PATTERN', 'SCOPES', 'Scope', 'KeyId', 'KeyInfo', 'CreatedKey', 'CreateKey',
        'KeyList', 'ListKeys', 'KeyRevoked', 'RevokeKey', 'SecretsRotated', 'RotateSecrets',
        'SANDBOX_PATTERN', 'SandboxName', 'SandboxInfo', 'SandboxList', 'CreateSandbox', 'ListSandboxes',
        'DURATION_PATTERN', 'Duration', 'TIME_OF_DAY_PATTERN', 'TimeOfDay', 'Weekday', 'Expression', 'JourneyEntry',
        'Branch', 'SplitPath', 'PushNode', 'ConditionNode', 'SplitNode', 'WaitNode', 'ReactionNode', 'UpdateNode',
        'EndNode', 'JourneyNode', 'Criterion', 'QuietHours', 'FrequencyCap', 'Reentrance', 'JourneySpec',
        'JourneyState', 'JourneyInfo', 'JourneyList', 'PublishJourney', 'GetJourney', 'ListJourneys', 'CloseJourney',
        'StopJourney', 'PauseJourney', 'ResumeJourney', 'SimulatedEvent', 'SimulatedPush', 'TraceStep', 'Simulation',
        'SimulateJourney', 'TraceJourney',
    },
    'protocols.connection': {
        'CallCancelled', 'CallReceived', 'ClientConnection', 'Closed', 'CreditGranted', 'EndReceived',
        'ErrorReceived', 'GoAwayReceived', 'HelloReceived', 'ItemReceived', 'PongReceived', 'ReplyReceived',
        'ServerConnection', 'State', 'Terminated', 'Welcomed'
    },
    'protocols.frames': {
        'AnyFrame', 'Call', 'CallId', 'Cancel', 'Credit', 'DEFAULT_MAX_FRAME', 'EMPTY_BODY', 'End', 'Error',
        'Frame', 'GoAway', 'Hello', 'Item', 'PROTOCOL_VERSION', 'Ping', 'Pong', 'Reply', 'Welcome'
    },
    'protocols.framing': {
        'DECODE_ERRORS', 'DEFAULT_MAX_FRAME', 'FrameDecoder', 'FrameEncoder', 'HEADER_SIZE', 'decode_error_text'
    },
    'protocols.errors': {
        'BatchFailed', 'CallError', 'ConnectionClosed', 'ErrorCode', 'FrameTooLarge', 'H2ProtocolError',
        'HandshakeError', 'HeaderListTooLong', 'HpackError', 'MalformedFrame', 'NotPigeonServer',
        'PigeonProtocolError', 'ProtocolError', 'Status'
    },
    'protocols.trio_client': {
        'BatchFailed', 'Client', 'EventBatcher', 'open_client'
    },
    'protocols.asyncio_client': {
        'BatchFailed', 'Client', 'EventBatcher', 'open_client', 'run'
    },
}


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_public_surface_is_pinned(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == SURFACE[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_every_method_is_served_by_exactly_one_domain() -> None:
    from server.runtime.app import METHODS

    served = [request_type.method for methods in METHODS for request_type, _, _, _ in methods.entries]
    assert sorted(served) == sorted(set(served)), "a method registered twice"
    assert set(served) == set(api.METHODS)


def test_every_method_declares_the_scope_a_key_needs() -> None:
    """Each method says, where its domain registers it, which scope an API key needs to call it
    (PROTOCOL.md 5.1): one of the scopes, or ``public`` (``server.health`` alone)."""
    from server.api.registry import IMPLIED
    from server.runtime.app import METHODS

    scopes = {request_type.method: scope for methods in METHODS for request_type, _, scope, _ in methods.entries}
    assert set(scopes) == set(api.METHODS)
    for method, scope in scopes.items():
        assert scope in IMPLIED or scope == "public", f"{method} declares no known scope: {scope!r}"
    assert [m for m, scope in scopes.items() if scope == "public"] == ["server.health"]
    assert set(api.SCOPES) == set(IMPLIED)


def test_each_handler_takes_the_request_and_gives_the_answer_of_its_method() -> None:
    """The registry types a handler loosely (any callable); its annotations must say what
    `protocols.api` says of its method, so that mypy checks the body against the protocol."""
    import typing

    from server.runtime.app import METHODS, Server

    for methods in METHODS:
        for request_type, handler, _, raw in methods.entries:
            spec = api.METHODS[request_type.method]
            hints = typing.get_type_hints(handler, localns={"Server": Server})  # imported for type checkers only
            assert hints["server"] is Server, spec.name
            assert hints["req"] is (type(None) if raw else spec.request), spec.name
            if spec.streaming:
                assert hints["return"] is type(None), spec.name
                assert typing.get_args(hints["send"])[0] == [spec.response], spec.name
            else:
                assert hints["return"] is spec.response, spec.name


def test_each_domain_registers_only_its_own_methods() -> None:
    """A method lives in the domain its name says (``profiles.get`` in `server.profiles`)."""
    from server.runtime.app import METHODS

    home = {
        "server": "server.runtime", "profiles": "server.profiles", "tokens": "server.profiles",
        "consent": "server.profiles", "events": "server.profiles", "apps": "server.delivery",
        "push": "server.delivery", "configs": "server.messages", "messages": "server.messages",
        "reports": "server.reports", "keys": "server.access", "sandboxes": "server.access", "journeys": "server.journeys",
        "secrets": "server.runtime",
    }
    for methods in METHODS:
        for request_type, handler, _, _ in methods.entries:
            family = request_type.method.split(".")[0]
            assert handler.__module__ == home[family] + ".methods", request_type.method


def _modules(*roots: str) -> dict[str, Path]:
    found = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports when it runs (at its top or in a function;
    not those under ``if TYPE_CHECKING:``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from server import templates`` imports the module; ``from server import Server``
            # the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            names = []
        for name in names:
            if name in known:  # a module, or the package a name comes from
                out.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(module)
    return out


def test_no_import_circles() -> None:
    known = _modules("server", "protocols", "plugins")
    graph = {module: _imports(module, path, known) for module, path in known.items()}
    circles = []
    state: dict[str, int] = {}

    def walk(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_long_modules_say_why_they_are_one_module() -> None:
    long = []
    for module, path in _modules("server", "protocols", "plugins").items():
        lines = len(path.read_text().splitlines())
        if lines > MODULE_LINES and not any(line.startswith("Why one module") for line in _docstring(path).splitlines()):
            long.append(f"{module}: {lines} lines")
    assert long == []


def test_functions_are_short() -> None:
    long = []
    for module, path in _modules("server", "protocols", "plugins").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
