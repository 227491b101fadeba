"""The report methods: ``reports.get`` and ``reports.watch``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from protocols import api
from server.api.registry import CallContext, Methods

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

methods = Methods()


@methods(api.GetReport, scope="read")
async def report(server: Server, ctx: CallContext, req: api.GetReport) -> api.Report:
    return server.reporting.report(req, ctx.sandbox)


@methods(api.WatchReport, scope="read")
async def watch_report(
    server: Server, ctx: CallContext, req: api.WatchReport, send: Callable[[api.Report], Awaitable[None]]
) -> None:
    # Until the client cancels, or the server stops (the stream then ends normally).
    reporting = server.reporting
    last = None
    while not server.stopping:
        seen = reporting.changes
        report = reporting.report(req, ctx.sandbox)
        if report != last:  # counts of other messages changed: nothing to send
            await send(report)
            last = report
        with trio.move_on_after(req.interval_s):
            await server.wait_stopping()
        if reporting.changes == seen and not server.stopping:
            await reporting.changed.wait()
