"""The method registry: which handler serves each protocol method.

Each domain of the server lists the methods it serves in its ``methods`` module, with a
`Methods` registry::

    methods = Methods()

    @methods(api.GetProfile, scope="operator")
    async def get_profile(server: Server, ctx: CallContext, req: api.GetProfile) -> api.Profile:
        ...

`Router.include` binds a domain's methods to the server; the listener routes each call by
its method name and decodes the request against the method's types (``protocols.api`` is the
single description of the protocol: a handler only names its request type).

Each method declares here, and only here, the scope an API key needs to call it
(``scope=``: ``admin``, ``operator``, ``ingest``, ``read``, or ``public`` for a method any
connection may call, with or without a key); `IMPLIED` says which scopes a key's scopes grant.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import msgspec.inspect

from protocols import api

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["CallContext", "Methods", "Route", "Router", "MethodScope", "IMPLIED", "granted"]

#: The scope a method needs: a key's scope, or ``public`` (no key needed).
MethodScope = Literal["admin", "operator", "ingest", "read", "public"]
#: The scopes each scope grants: admin everything, operator also ingest and read.
IMPLIED: dict[str, frozenset[str]] = {
    "admin": frozenset(("admin", "operator", "ingest", "read")),
    "operator": frozenset(("operator", "ingest", "read")),
    "ingest": frozenset(("ingest",)),
    "read": frozenset(("read",)),
}


def granted(scopes: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Every scope a key with ``scopes`` has, ``public`` included."""
    out = {"public"}
    for scope in scopes:
        out |= IMPLIED.get(scope, frozenset())
    return frozenset(out)

#: ``handler(ctx, request)``, or ``handler(ctx, request, send)`` for a streamed method.
Handler = Callable[..., Awaitable[Any]]
#: A domain's handler: the same, with the server first.
ServerHandler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=ServerHandler)


class CallContext(msgspec.Struct):
    """What a handler knows about the call besides its request."""

    method: str
    peer: str
    client: str
    #: The call's undecoded body, for handlers that decode it themselves.
    body: msgspec.Raw
    #: Whether the peer is on this machine (a loopback or unix connection).
    local: bool = False
    #: The scopes the connection's key grants (every scope when the server asks for no key).
    scopes: frozenset[str] = frozenset(("admin", "operator", "ingest", "read"))
    #: The sandbox the connection works in (its key's, or the one its hello names without keys).
    sandbox: str = "default"


class Route(msgspec.Struct, frozen=True):
    """A method's handler and how its requests are decoded."""

    spec: api.MethodSpec
    handler: Callable[..., Awaitable[Any]]
    decoder: msgspec.msgpack.Decoder | None
    #: The request's free-form maps (``dict[str, Any]`` fields): their depth is checked.
    maps: tuple[str, ...] = ()
    #: The scope a key needs to call it (`Methods` makes every method say which).
    scope: MethodScope = "admin"


def free_form_maps(request_type: type) -> tuple[str, ...]:
    """The fields of ``request_type`` that hold any map (attributes, payloads, ...)."""
    names = []
    for field in msgspec.inspect.type_info(request_type).fields:  # type: ignore[attr-defined]
        types = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        if any(isinstance(t, msgspec.inspect.DictType) and isinstance(t.value_type, msgspec.inspect.AnyType)
               for t in types):
            names.append(field.name)
    return tuple(names)


class Router:
    """Maps method names to handlers; requests are decoded against the method's types."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}

    def add(
        self, request_type: type, handler: Callable[..., Awaitable[Any]], *, scope: MethodScope, raw: bool = False
    ) -> None:
        """Route ``request_type.method`` to ``handler(ctx, request)`` (or ``(ctx, request, send)``
        for a streamed method), callable with a key of ``scope``. With ``raw`` the handler gets
        ``None`` and decodes ``ctx.body``."""
        spec = api.METHODS[request_type.method]  # type: ignore[attr-defined]
        if spec.name in self.routes:
            raise ValueError(f"{spec.name} has two handlers")
        if scope not in IMPLIED and scope != "public":
            raise ValueError(f"{spec.name}: unknown scope {scope!r}")
        decoder: msgspec.msgpack.Decoder[Any] | None = None if raw else msgspec.msgpack.Decoder(spec.request)
        self.routes[spec.name] = Route(spec, handler, decoder, () if raw else free_form_maps(spec.request), scope)

    def include(self, methods: Methods, server: Server) -> None:
        """Route every method of ``methods`` to its handler, bound to ``server``."""
        for request_type, handler, scope, raw in methods.entries:
            self.add(request_type, functools.partial(handler, server), scope=scope, raw=raw)


class Methods:
    """The protocol methods one domain serves, registered with
    ``@methods(RequestType, scope=...)`` (the scope a key needs, see `IMPLIED`).

    A handler takes ``(server, ctx, request)``, or ``(server, ctx, request, send)`` for a
    streamed method; with ``raw=True`` it gets ``None`` for the request and decodes
    ``ctx.body`` itself.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[type, ServerHandler, MethodScope, bool]] = []

    def __call__(self, request_type: type, *, scope: MethodScope, raw: bool = False) -> Callable[[H], H]:
        def register(handler: H) -> H:
            self.entries.append((request_type, handler, scope, raw))
            return handler

        return register
