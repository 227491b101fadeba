"""The method registry: which handler serves each protocol method.

Each domain of the server lists the methods it serves in its ``methods`` module, with a
`Methods` registry::

    methods = Methods()

    @methods(api.GetProfile)
    async def get_profile(server: Server, ctx: CallContext, req: api.GetProfile) -> api.Profile:
        ...

`Router.include` binds a domain's methods to the server; the listener routes each call by
its method name and decodes the request against the method's types (``protocols.api`` is the
single description of the protocol: a handler only names its request type).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import msgspec.inspect

from protocols import api

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["CallContext", "Methods", "Route", "Router"]

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


class Route(msgspec.Struct, frozen=True):
    """A method's handler and how its requests are decoded."""

    spec: api.MethodSpec
    handler: Callable[..., Awaitable[Any]]
    decoder: msgspec.msgpack.Decoder | None
    #: The request's free-form maps (``dict[str, Any]`` fields): their depth is checked.
    maps: tuple[str, ...] = ()


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

    def add(self, request_type: type, handler: Callable[..., Awaitable[Any]], *, raw: bool = False) -> None:
        """Route ``request_type.method`` to ``handler(ctx, request)`` (or ``(ctx, request, send)``
        for a streamed method). With ``raw`` the handler gets ``None`` and decodes ``ctx.body``."""
        spec = api.METHODS[request_type.method]  # type: ignore[attr-defined]
        if spec.name in self.routes:
            raise ValueError(f"{spec.name} has two handlers")
        decoder: msgspec.msgpack.Decoder[Any] | None = None if raw else msgspec.msgpack.Decoder(spec.request)
        self.routes[spec.name] = Route(spec, handler, decoder, () if raw else free_form_maps(spec.request))

    def include(self, methods: Methods, server: Server) -> None:
        """Route every method of ``methods`` to its handler, bound to ``server``."""
        for request_type, handler, raw in methods.entries:
            self.add(request_type, functools.partial(handler, server), raw=raw)


class Methods:
    """The protocol methods one domain serves, registered with ``@methods(RequestType)``.

    A handler takes ``(server, ctx, request)``, or ``(server, ctx, request, send)`` for a
    streamed method; with ``raw=True`` it gets ``None`` for the request and decodes
    ``ctx.body`` itself.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[type, ServerHandler, bool]] = []

    def __call__(self, request_type: type, *, raw: bool = False) -> Callable[[H], H]:
        def register(handler: H) -> H:
            self.entries.append((request_type, handler, raw))
            return handler

        return register
