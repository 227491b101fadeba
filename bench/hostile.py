"""Hostile peers against a real server: what an attack costs the clients that behave.

    python -m bench.hostile                 # every attack (about two minutes)
    python -m bench.hostile --only idle     # one of: nesting, idle, nonreading, flood

Each attack runs against a fresh ``pigeon serve`` in a child process, on loopback, from this
process, while a bystander client keeps using the server:

- ``nesting``: frames nested 1,000 levels deep (1 KB each, as hellos and as calls), 19 of them
  spread over 30 s, then 6 within 10 s; the bystander calls ``server.health`` on its own
  connection every 100 ms: the share answered, and whether the process is still up;
- ``idle``: 2,000 connections that never say hello, held open; the bystander connects, says
  hello and calls ``server.health``, again and again: the share answered;
- ``nonreading``: 10 connections each pipelining 256 ``profiles.get`` of a 255 KB profile, then
  200 connections x 24, none reading an answer: the server's RSS growth and the answer bytes
  it holds (``server.stats``);
- ``flood``: 50 connections each keeping 64 ``events.ingest`` calls of 100 events in flight for
  20 s; the bystander calls ``profiles.get`` with one call at a time: its latency, against the
  same calls on the idle server.

Figures are printed and written as JSON (``bench/results/hostile.json`` by default).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from typing import Any

import msgspec
import trio

from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.frames import PROTOCOL_VERSION, Call, Hello
from protocols.framing import FrameEncoder
from protocols.trio_client import open_client

from ._harness import Latencies, ServerUnderTest, machine, write_results

_encoder = FrameEncoder()


def _nested_frame(tag: str, depth: int = 1_000) -> bytes:
    fields = {"t": tag, "version": PROTOCOL_VERSION} if tag == "hello" else {"t": tag, "id": 1, "method": "server.health"}
    payload = bytearray([0x80 | (len(fields) + 1)])
    for key, value in fields.items():
        payload += msgspec.msgpack.encode(key) + msgspec.msgpack.encode(value)
    payload += msgspec.msgpack.encode("x") + b"\x91" * depth + b"\x01"
    return len(payload).to_bytes(4, "big") + bytes(payload)


async def _health(address: str, timeout: float = 2.0) -> bool:
    try:
        with trio.fail_after(timeout):
            async with open_client(address) as client:
                return (await client.call(api.GetHealth())).status == "serving"
    except (PigeonProtocolError, OSError, trio.TooSlowError):
        return False


async def _stats(address: str) -> api.Stats:
    async with open_client(address) as client:
        return await client.call(api.GetStats())


async def _stats_if_any(address: str) -> api.Stats | None:
    """The server's stats, or None if it does not answer (refused, gone)."""
    try:
        with trio.fail_after(5):
            return await _stats(address)
    except (PigeonProtocolError, OSError, trio.TooSlowError):
        return None


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def nesting(address: str, proc: Any) -> dict[str, Any]:
    host, port = _host_port(address)
    answered = asked = 0
    done = trio.Event()

    async def bystander() -> None:
        """One connection, kept while it works; a call not answered within a second, or a
        connection lost, counts as unanswered (and a new connection is made)."""
        nonlocal answered, asked
        while not done.is_set():
            try:
                async with open_client(address) as client:
                    while not done.is_set():
                        asked += 1
                        with trio.fail_after(1):
                            await client.call(api.GetHealth())
                        answered += 1
                        await trio.sleep(0.1)
            except (PigeonProtocolError, OSError, trio.TooSlowError):
                await trio.sleep(0.1)

    async def attack(count: int, spread: float) -> None:
        for i in range(count):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:  # the port is closed: the server is restarting its listener, or gone
                await trio.sleep(spread / count)
                continue
            if i % 2 == 0:
                await stream.send_all(_nested_frame("hello"))
            else:
                await stream.send_all(_encoder.frame(Hello(version=PROTOCOL_VERSION)) + _nested_frame("call"))
            await trio.sleep(spread / count)
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bystander)
        await attack(19, 30)
        await attack(6, 5)
        await trio.sleep(1)
        done.set()
    stats = await _stats_if_any(address)
    return {
        "frames": 25,
        "bystander_calls": asked,
        "bystander_answered": answered,
        "availability": round(answered / max(asked, 1), 4),
        "process_alive": proc.external is not None or proc.process.proc.poll() is None,
        "listener_restarts": next(a.restarts for a in stats.actors if a.name == "listener") if stats else None,
        "closed_by_protocol_error": stats.connections.closed_by_protocol_error if stats else None,
    }


async def idle(address: str, proc: Any) -> dict[str, Any]:
    host, port = _host_port(address)
    held: list[trio.SocketStream] = []
    refused = 0

    async def hold(count: int) -> None:
        nonlocal refused
        for _ in range(count):
            try:
                held.append(await trio.open_tcp_stream(host, port))
            except OSError:
                refused += 1
            await trio.sleep(0)

    await hold(2_000)
    results = []
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, 2_000)  # more while the bystander tries
        for _ in range(300):
            results.append(await _health(address))
    elapsed = time.monotonic() - started
    stats = await _stats_if_any(address)
    for stream in held:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return {
        "idle_connections_opened": len(held),
        "bystander_checks": len(results),
        "availability": round(sum(results) / len(results), 4),
        "seconds": round(elapsed, 2),
        "evicted": getattr(stats.connections, "evicted", None) if stats else None,
        "open_at_end": stats.connections.open if stats else None,
        "handshaking_at_end": getattr(stats.connections, "handshaking", None) if stats else None,
    }


def _silent(address: str, frames: bytes) -> socket.socket:
    sock = socket.create_connection(_host_port(address))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION)) + frames)
    return sock


async def _settled(address: str) -> api.Stats:
    """Stats once the server has stopped answering the silent clients."""
    last = -1
    while True:
        await trio.sleep(0.5)
        stats = await _stats(address)
        calls = stats.methods["profiles.get"].calls
        if calls == last:
            return stats
        last = calls


async def nonreading(address: str, proc: Any) -> dict[str, Any]:
    async with open_client(address) as client:
        await client.call(api.UpsertProfile(identity="crm:big", attributes={"blob": "x" * 255_000}))
    body = _encoder.body(api.GetProfile(identity="crm:big"))
    out = {}
    for connections, calls in ((10, 256), (200, 24)):
        before = await _stats(address)
        frames = b"".join(_encoder.frame(Call(id=i + 1, method="profiles.get", body=body)) for i in range(calls))
        socks = [_silent(address, frames) for _ in range(connections)]
        after = await _settled(address)
        out[f"{connections}x{calls}"] = {
            "request_bytes": len(frames) * connections,
            "answers_if_all_queued_mb": round(connections * calls * 255_000 / 2**20, 1),
            "rss_growth_mb": round((after.process.rss_bytes - before.process.rss_bytes) / 2**20, 1),
            "buffered_mb": round(getattr(after.connections, "buffered_bytes", 0) / 2**20, 1),
            "answered_so_far": after.methods["profiles.get"].calls - before.methods.get("profiles.get", api.MethodStats()).calls,
        }
        for sock in socks:
            sock.close()
        await trio.sleep(1)
    return out


async def _bystander_reads(address: str, seconds: float) -> Latencies:
    latencies = Latencies()
    async with open_client(address) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await client.call(api.GetProfile(identity="crm:reader"))
            latencies.record(time.perf_counter() - started)
            await trio.sleep(0.005)
    return latencies


async def _flood(address: str, seconds: float) -> None:
    """50 connections, 64 ``events.ingest`` calls of 100 events in flight on each; prints the
    events acknowledged."""
    batch = api.IngestEvents(events=[api.Event(identity=f"crm:{i}", type="app.launch", data={"n": i}) for i in range(100)])
    acknowledged = 0

    async def flooder() -> None:
        nonlocal acknowledged
        async with open_client(address) as client:

            async def one() -> None:
                nonlocal acknowledged
                while True:
                    await client.call(batch)
                    acknowledged += 100

            async with trio.open_nursery() as calls:
                for _ in range(64):
                    calls.start_soon(one)

    with trio.move_on_after(seconds):
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(flooder)
        except* (PigeonProtocolError, OSError):
            pass  # the server went away
    print(acknowledged)


async def flood(address: str, proc: Any) -> dict[str, Any]:
    async with open_client(address) as client:
        await client.call(api.UpsertProfile(identity="crm:reader", attributes={"name": "Ada", "tier": "gold"}))
    quiet = await _bystander_reads(address, 5)
    # The flood from another process, so that the bystander's own loop is not part of it.
    flooder = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.hostile", "--flood", address, "--seconds", "22"], stdout=subprocess.PIPE)
    await trio.sleep(2)  # the flood is under way
    loaded = await _bystander_reads(address, 18)
    assert flooder.stdout is not None
    out = b""
    while chunk := await flooder.stdout.receive_some():
        out += chunk
    await flooder.wait()
    return {
        "events_acknowledged": int(out or 0),
        "bystander_idle_server": quiet.summary(),
        "bystander_under_flood": loaded.summary(),
    }


ATTACKS = {"nesting": nesting, "idle": idle, "nonreading": nonreading, "flood": flood}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(ATTACKS), action="append")
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--address", help="attack a server already running there (under a profiler, say)")
    parser.add_argument("--flood", metavar="ADDRESS", help=argparse.SUPPRESS)  # the flood's own process
    parser.add_argument("--seconds", type=float, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood:
        trio.run(_flood, args.flood, args.seconds)
        return 0
    results: dict[str, Any] = {"machine": machine()}
    for name in args.only or ATTACKS:
        with ServerUnderTest(env={"PIGEON_STORE__SYNC": "false"}, address=args.address) as server:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = trio.run(ATTACKS[name], server.address, server)
            print(f"{name}: {results[name]}", flush=True)
    path = write_results("hostile", results, args.out)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
