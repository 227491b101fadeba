"""Server lifecycle: graceful stop on SIGTERM/SIGINT, escalation at the root, start-up errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import trio

from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import open_client
from server import RestartIntensityExceeded, Server
from server.cli.main import main

from .conftest import make_config


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_exit_0_and_commits_in_flight_writes(spawn_server, signum):
    proc = spawn_server()
    acked: list[int] = []

    async def ingest_then_signal() -> None:
        async with open_client(proc.address) as client:
            async with trio.open_nursery() as nursery:

                async def writer(k: int) -> None:
                    for n in range(1000):
                        events = [api.Event(identity=f"crm:{k}", type="t", data={"n": n})] * 50
                        try:
                            result = await client.call(api.IngestEvents(events=events))
                        except PigeonProtocolError:
                            return
                        acked.append(result.accepted)

                for k in range(4):
                    nursery.start_soon(writer, k)
                await trio.sleep(0.3)
                proc.signal(signum)

    started = time.monotonic()
    trio.run(ingest_then_signal)
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 15
    log = "".join(proc.log)
    assert f"received {signal.Signals(signum).name}" in log and "stopped" in log

    proc.start()

    async def count() -> int:
        async with open_client(proc.address) as client:
            return (await client.call(api.GetStats())).store.events

    assert trio.run(count) >= sum(acked) > 0


async def test_root_escalation_stops_the_server_with_the_reason(tmp_path, monkeypatch):
    srv = Server(make_config(tmp_path / "d", supervisor={"intensity": 2, "period_s": 60, "backoff_min_s": 0.01}))
    runs = []

    async def crashing_run(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        runs.append(1)
        await trio.sleep(0.01)
        raise RuntimeError("journeys engine exploded")

    monkeypatch.setattr(srv.journeys, "run", crashing_run)
    with pytest.RaisesGroup(pytest.RaisesExc(RestartIntensityExceeded, match="3 crashes within 60s, the last in actor 'journeys'"), flatten_subgroups=True):
        with trio.fail_after(10):
            await srv.run()
    assert len(runs) == 3  # the first run and two restarts


def test_cli_serve_exits_non_zero_when_the_root_gives_up(tmp_path, monkeypatch, caplog):
    from server.journeys import engine as _journeys

    async def crashing_run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(_journeys.Journeys, "run", crashing_run)
    monkeypatch.setenv("PIGEON_SUPERVISOR__INTENSITY", "1")
    monkeypatch.setenv("PIGEON_SUPERVISOR__BACKOFF_MIN_S", "0.01")
    code = main(["serve", "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0"])
    assert code == 1
    assert "pigeon is exiting" in caplog.text and "engine exploded" in caplog.text


def test_cli_serve_reports_configuration_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIGEON_STORE__MAP_SIZE_MB", "lots")
    assert main(["serve", "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "store.map_size_mb" in err and "PIGEON_STORE__MAP_SIZE_MB" in err


def test_a_data_folder_that_cannot_be_used_stops_start_up_with_a_clear_error(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["serve", "--data", str(blocker / "data"), "--listen", "127.0.0.1:0"]) == 1
    assert "cannot open the data folder" in caplog.text


def test_address_in_use_is_a_clear_error(spawn_server, tmp_path, caplog):
    proc = spawn_server()
    code = main(["serve", "--data", str(tmp_path / "other"), "--listen", proc.address])
    assert code == 1
    assert "Address already in use" in caplog.text or "address already in use" in caplog.text.lower()


async def test_stats_show_actors_and_method_latency(client, server):
    await client.call(api.UpsertProfile(identity="crm:1"))
    await client.call(api.GetProfile(identity="crm:1"))
    stats = await client.call(api.GetStats())
    names = [a.name for a in stats.actors]
    assert names == ["store", "access", "reporting", "delivery", "journeys", "ingestion", "listener"]
    assert all(a.state == "running" and a.restarts == 0 for a in stats.actors)
    store = next(a for a in stats.actors if a.name == "store")
    assert store.mailbox_size == 1024 and store.details["commits"] >= 1
    assert stats.methods["profiles.get"].calls == 1 and stats.methods["profiles.get"].p50_us > 0
    assert stats.store.profiles == 1 and stats.process.cpu_user_s > 0 and stats.process.rss_bytes > 0
    assert stats.connections.open == 1


async def test_a_crashed_actor_is_restarted_and_visible_in_stats(client, server):
    # a message the reporting actor cannot handle crashes it; the supervisor restarts it
    await server.reporting.send([object()])  # its mailbox takes lists of report events
    with trio.fail_after(10):
        while True:
            stats = await client.call(api.GetStats())
            reporting = next(a for a in stats.actors if a.name == "reporting")
            if reporting.restarts == 1 and reporting.state == "running":
                break
            await trio.sleep(0.01)
    assert reporting.crashes == 1 and "AttributeError" in reporting.last_error
    others = [a for a in stats.actors if a.name != "reporting"]
    assert all(a.restarts == 0 and a.state == "running" for a in others)


async def test_a_stop_with_writes_in_flight_crashes_nothing(tmp_path):
    srv = Server(make_config(tmp_path / "d"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            async with trio.open_nursery() as calls:
                for k in range(30):

                    async def gone(k: int = k) -> None:
                        with trio.move_on_after(0.001):  # the caller leaves; the server goes on
                            await c.call(api.IngestEvents(events=[api.Event(identity=f"crm:{k}", type="t")] * 200))

                    calls.start_soon(gone)
        srv.request_stop()
    assert all(s.crashes == 0 for s in srv.supervisor.statistics()), srv.supervisor.statistics()


def test_a_second_server_on_the_same_data_folder_is_refused(spawn_server, tmp_path):
    first = spawn_server()
    second = spawn_server(data=first.data, start=False)
    with pytest.raises(RuntimeError, match="in use by another Pigeon server"):
        second.start()
    assert second.proc.returncode == 1
    assert f"pid {first.proc.pid}" in "".join(second.log)
    assert first.stop() == 0


def test_a_second_signal_forces_the_stop_with_exit_1(spawn_server):
    proc = spawn_server(env={"PIGEON_SHUTDOWN_GRACE_S": "30"})

    async def hold_a_stream_open() -> None:
        async with open_client(proc.address) as client:
            await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t")] * 200))
        # a stream with a window of 1 whose client never grants credit keeps a call in flight
        import socket as sockets

        from protocols.frames import PROTOCOL_VERSION, Call, Hello
        from protocols.framing import FrameEncoder

        encoder = FrameEncoder()
        host, port = proc.address.rsplit(":", 1)
        sock = sockets.create_connection((host, int(port)))
        sock.sendall(encoder.frame(Hello(version=PROTOCOL_VERSION)))
        sock.sendall(encoder.frame(Call(id=1, method="events.list", body=encoder.body({"identity": "crm:1"}), window=1)))
        await trio.sleep(0.3)
        proc.signal(signal.SIGTERM)
        await trio.sleep(0.5)
        assert proc.proc.poll() is None  # still finishing the call in flight
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 1
        sock.close()

    trio.run(hold_a_stream_open)
    assert "again; exiting now" in "".join(proc.log)


def test_a_listen_address_out_of_range_is_refused_before_the_data_folder_exists(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d"
    assert main(["serve", "--data", str(data), "--listen", "127.0.0.1:99999"]) == 2
    err = capsys.readouterr().err
    assert "configuration key 'listen'" in err and "'127.0.0.1:99999' is not HOST:PORT" in err
    assert not data.exists()
    # So is a CA file that cannot be read (the FCM channel failed on it once started, again and again).
    monkeypatch.setenv("PIGEON_FCM__CA_FILE", str(tmp_path / "no-ca.pem"))
    assert main(["serve", "--data", str(data), "--listen", "127.0.0.1:0"]) == 2
    assert f"configuration key 'fcm.ca_file': cannot read the file '{tmp_path / 'no-ca.pem'}'" in capsys.readouterr().err
    assert not data.exists()
    monkeypatch.delenv("PIGEON_FCM__CA_FILE")
    # So is a ready file whose folder does not exist.
    assert main(["serve", "--data", str(data), "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "no" / "ready")]) == 2
    assert "--ready-file" in capsys.readouterr().err and not data.exists()


def test_the_ready_file_names_the_bound_addresses_and_goes_with_the_server(tmp_path):
    ready = tmp_path / "pigeon.ready"
    ready.write_text("127.0.0.1:1\n")  # left by a server killed earlier: never read as this one's
    socket_path = tmp_path / "pigeon.sock"
    command = [sys.executable, "-m", "server.cli", "serve", "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
               "--listen", f"unix:{socket_path}", "--ready-file", str(ready), "--log-level", "warning"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 20
            while not (ready.exists() and ready.read_text() != "127.0.0.1:1\n"):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.02)
            tcp, unix = ready.read_text().splitlines()
            assert tcp.startswith("127.0.0.1:") and tcp != "127.0.0.1:0" and unix == f"unix:{socket_path}"

            async def health(address: str) -> str:
                async with open_client(address) as client:
                    return (await client.call(api.GetHealth())).status

            assert trio.run(health, tcp) == trio.run(health, unix) == "serving"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not ready.exists()
