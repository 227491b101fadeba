"""``pigeon demo`` as a newcomer runs it: a real process with the mocks, its output checked
against what it stored."""

from __future__ import annotations

import re
import subprocess
import os
import sys

import trio

from protocols import api
from protocols.trio_client import open_client
from server.testing import ServerProcess


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "demo", *args], capture_output=True, text=True, timeout=120)


def test_pigeon_demo_runs_the_whole_flow(tmp_path):
    r = demo("--data", str(tmp_path / "demo"), "--profiles", "14")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ios (com.example.pigeon-demo)" in out and "android (com.example.pigeon-demo)" in out
    assert "report for welcome-back:" in out
    [summary] = [line for line in out.splitlines() if line.startswith("message welcome-back v1, execution")]
    assert "15 profile(s), 15 targeted" in summary and "bounced" in summary
    [totals] = [line.split() for line in out.splitlines() if line.startswith("all ")]
    targeted, excluded, sent, delivered, failed, bounced, opened, unique_opened, action = map(int, totals[1:])
    assert targeted == excluded + sent and sent == delivered + failed
    assert bounced >= 1 and opened >= 1 and (tmp_path / "demo" / "data").is_dir()
    assert unique_opened == opened  # one device per profile, each opened once at most
    # the journey: everyone entered at hello and ended at done; those who did not open got the reminder
    rows = {line.split()[0]: [int(v) for v in line.split()[2:]] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in ("hello", "opened", "reminder", "done") and len(line.split()) == 13}  # with WAITING
    hello, reminder, done = rows["hello"], rows["reminder"], rows["done"]
    assert (hello[0], done[1]) == (14, 14)  # entered, exited
    assert hello[2] == hello[3] + hello[4] and hello[4] == hello[5] + hello[6]  # targeted, excluded, sent, ...
    assert hello[7] >= 1 and reminder[2] == 14 - hello[7]  # opened hello; the others targeted by the reminder
    assert reminder[2] == reminder[3] + reminder[4] and reminder[4] >= 1  # the reminders settled before the report
    assert "done: exited end 14" in out


def test_the_demo_says_what_it_created_and_its_counts_are_those_of_the_store(tmp_path):
    r = demo("--data", str(tmp_path / "demo"), "--profiles", "14")
    assert r.returncode == 0, r.stdout + r.stderr
    # The profiles it created, by identity.
    assert "crm:1000 to crm:1013" in r.stdout and "crm:999 without a device" in r.stdout
    [counts] = re.findall(r"(\d+) iOS tokens, (\d+) of them stale .*?, and (\d+) Android tokens, (\d+) of them stale", r.stdout)
    ios, stale_ios, android, stale_android = map(int, counts)
    [opted_out] = re.findall(r"opted out of the app's push: (.*)", r.stdout)

    # What the store holds (the demo's data stays in its folder).
    async def stored() -> tuple[dict[str, int], dict[str, int], list[str]]:
        registrations: dict[str, int] = {}
        invalid: dict[str, int] = {}
        out: list[str] = []
        with ServerProcess(tmp_path / "demo" / "data") as server:
            async with open_client(server.address) as client:
                for n in range(1000, 1014):
                    profile = await client.call(api.GetProfile(identity=f"crm:{n}"))
                    for reg in profile.registrations:
                        registrations[reg.platform] = registrations.get(reg.platform, 0) + 1
                        if reg.state == "invalid":
                            invalid[reg.platform] = invalid.get(reg.platform, 0) + 1
                    if any(c.push == "out" for c in profile.consent.values()):
                        out.append(f"crm:{n}")
        return registrations, invalid, out

    registrations, invalid, out = trio.run(stored)
    assert (ios, android) == (registrations["apns-sandbox"], registrations["fcm"]) == (7, 7)
    assert opted_out.split(", ") == out == ["crm:1005"]
    # Stale tokens were sent to (the ones of profiles not opted out) and are now marked invalid.
    assert (stale_ios, stale_android) == (invalid.get("apns-sandbox", 0), invalid.get("fcm", 0)) == (1, 1)


def test_no_profile_is_refused_with_a_clear_message():
    r = demo("--profiles", "0")
    assert r.returncode == 2
    assert "--profiles" in r.stderr and "at least 1" in r.stderr and "Traceback" not in r.stderr


def test_the_demo_never_claims_opt_outs_it_did_not_make(tmp_path):
    r = demo("--data", str(tmp_path / "demo"), "--profiles", "5")  # one profile in eleven opts out: none of 5
    assert r.returncode == 0, r.stdout + r.stderr
    assert "opted out" not in r.stdout
    assert "NoConsent" not in r.stdout


def test_a_second_demo_in_the_same_folder_is_refused_before_it_adds_to_the_first(tmp_path):
    folder = tmp_path / "demo"
    first = demo("--data", str(folder), "--profiles", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    before = sorted(p.name for p in folder.iterdir())
    second = demo("--data", str(folder), "--profiles", "3")
    assert second.returncode == 2
    assert f"--data {folder} is not empty" in second.stderr and "Traceback" not in second.stderr
    assert second.stdout == "" and sorted(p.name for p in folder.iterdir()) == before
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert demo("--data", str(tmp_path / "empty"), "--profiles", "1").returncode == 0


def test_a_closed_output_ends_the_demo_quietly(tmp_path):
    # Unbuffered, so that the demo writes each line as it goes, as into a terminal: the reader
    # is surely gone before the next one (with a buffer, it all might fit in the pipe at exit).
    with subprocess.Popen([sys.executable, "-m", "server.cli", "demo", "--data", str(tmp_path / "demo"), "--profiles", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("data folder")
        proc.stdout.close()  # as `pigeon demo | head -1` does
        err = proc.stderr.read()
        assert proc.wait(120) == 141
    assert err == ""
