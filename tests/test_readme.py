"""README.md's shell blocks, run in order as a newcomer pastes them into one terminal.

Every ```sh block is run, top to bottom, in one bash session (sourced one after the other, so
that what a block sets up, the venv's PATH and the background servers, is there for the next),
in a fresh folder holding a link to this venv as ``.venv`` (the README is written for the root
of a checkout that has one), with ``set -e``: any command that fails stops the session, and
the test names the block. A block whose first line is ``# not run by tests/test_readme.py``
(the install, the test suite itself, the benchmarks, recipes that need an Apple account) is
left out; the README says so where it introduces the session.

Two things differ from a newcomer's terminal, so that two runs on one machine cannot collide:
the ports the README names (the server's default 7600, the mocks' 2197 and 2198) are moved
to free ones, through ``PIGEON_LISTEN``/``PIGEON_SERVER`` for the default and by rewriting the
two mock addresses in the blocks; and ``TMPDIR`` is the test's folder (``pigeon demo``'s data).
Whatever the blocks leave running is killed at the end (they run in their own process group).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

#: The first line of a block the test leaves out.
SKIP = "# not run by tests/test_readme.py"

#: The session as a whole; it takes about half a minute.
TIMEOUT_S = 180


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """The ```sh (or ```bash) blocks of a Markdown text: (line number, code), in order."""
    blocks = []
    for match in re.finditer(r"^```(?:sh|bash)[ \t]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_shell_blocks_are_found_and_the_skipped_ones_say_so():
    blocks = shell_blocks(README.read_text())
    skipped = [code for _, code in blocks if code.startswith(SKIP)]
    run = [code for _, code in blocks if not code.startswith(SKIP)]
    assert len(run) >= 8 and len(skipped) >= 3
    # The two quick-start commands are left out (one serves until Ctrl-C, the other is this suite).
    assert any("pigeon serve" in code and "pip install -e ." in code for code in skipped)
    assert any("python -m pytest" in code for code in skipped)
    # One session: one server, both mocks, in the background; a preview of a stored profile.
    session = "\n".join(run)
    assert session.count("pigeon serve ") == 1 and session.count("pigeon mock-apns ") == 1
    assert session.count("pigeon mock-fcm ") == 1
    assert session.index("pigeon profiles upsert crm:42") < session.index("pigeon messages preview cart --identity crm:42")


def test_the_readme_runs_top_to_bottom(tmp_path):
    blocks = [(line, code) for line, code in shell_blocks(README.read_text()) if not code.startswith(SKIP)]
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    apns, fcm, pigeon = free_port(), free_port(), free_port()
    progress = tmp_path / "progress"
    driver = ["set -e"]
    for n, (line, code) in enumerate(blocks):
        code = code.replace("127.0.0.1:2197", f"127.0.0.1:{apns}").replace("127.0.0.1:2198", f"127.0.0.1:{fcm}")
        path = tmp_path / f"block-{n}.sh"
        path.write_text(code)
        driver += [f"echo {line} > {progress}", f". {path}"]
    driver.append(f"echo done > {progress}")
    (tmp_path / "session.sh").write_text("\n".join(driver) + "\n")

    env = {key: value for key, value in os.environ.items() if not key.startswith("PIGEON_")}
    env.update(PIGEON_LISTEN=f"127.0.0.1:{pigeon}", PIGEON_SERVER=f"127.0.0.1:{pigeon}", TMPDIR=str(tmp_path))
    env.pop("VIRTUAL_ENV", None)
    out = (tmp_path / "out").open("w")  # not pipes: the servers the blocks start hold them open
    proc = subprocess.Popen(["bash", str(tmp_path / "session.sh")], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _end_group(proc.pid)
        out.close()
    reached = progress.read_text().strip() if progress.exists() else "(none)"
    output = (tmp_path / "out").read_text()
    where = "the end" if reached == "done" else f"the block at README.md line {reached}"
    assert code == 0 and reached == "done", f"the session stopped in {where} (status {code}):\n{output[-6000:]}"
    # What the last blocks did, as a newcomer would read it.
    assert "message cart v1" in output and "TARGETED" in output


def _end_group(pgid: int) -> None:
    """Stop whatever the session left running: SIGTERM, then SIGKILL after a few seconds."""
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
