"""A scripted HTTP/2 server over Trio memory streams, for the faults no mock provider offers
(a GOAWAY before any answer, a stream never answered, SETTINGS then a close, a malformed
frame). It plugs into an `H2Pool` in place of its TCP + TLS connect; each test says what the
server does with each request (``on_request``) and after its SETTINGS (``on_connect``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
import trio.testing

from server.delivery.http2 import H2Pool


class FakeH2Server:
    def __init__(
        self,
        nursery: trio.Nursery,
        on_request: Callable[[FakeH2Server, h2.connection.H2Connection, int], Any] | None = None,
        on_connect: Callable[[h2.connection.H2Connection], str | None] | None = None,
        max_streams: int = 100,
    ) -> None:
        self.nursery = nursery
        self.on_request = on_request or (lambda server, conn, sid: server.ok(conn, sid))
        self.on_connect = on_connect
        self.max_streams = max_streams
        self.connections = 0
        self.requests = 0
        self.last_stream: trio.testing.MemorySendStream | Any = None

    def plug(self, pool: H2Pool) -> H2Pool:
        pool.connect = self.connect  # type: ignore[method-assign]
        return pool

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self.connections += 1
        self.nursery.start_soon(self._serve, server)
        return client

    @staticmethod
    def ok(conn: h2.connection.H2Connection, stream_id: int) -> None:
        conn.send_headers(stream_id, [(b":status", b"200"), (b"apns-id", b"00000000-0000-0000-0000-000000000000")], end_stream=True)

    async def _serve(self, stream: Any) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        conn.initiate_connection()
        self.last_stream = stream
        try:
            await stream.send_all(conn.data_to_send())
            if self.on_connect is not None:
                what = self.on_connect(conn)
                await stream.send_all(conn.data_to_send())
                if what == "close":
                    await stream.aclose()
                    return
                if what == "read-then-close":
                    await stream.receive_some(65536)
                    await stream.aclose()
                    return
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        self.requests += 1
                        self.on_request(self, conn, event.stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            return
