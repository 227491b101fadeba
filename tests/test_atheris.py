"""The atheris harnesses of tests/fuzz/, each run for a bounded number of inputs.

Each harness is coverage-guided fuzzing of one untrusted input of the server (the socket
protocol's frames, a call's body, an event batch, a template, a push provider's HTTP/2
answers) and asserts its invariants (see
each harness's docstring). Here each runs in its own process from its seeds, with a fixed
libFuzzer seed (``PIGEON_FUZZ_SEED`` changes it) for ``runs`` inputs, at most 30 s (a few
seconds on a quiet machine; ``PIGEON_FUZZ_SCALE`` multiplies the runs), and fails on any
crash: an exception a harness does not allow, a broken invariant, an input over its time bound
(libFuzzer's ``-timeout`` too) or over 2 GB of memory. The input that failed is kept in the
test's temporary folder and named in the failure; replay it with
``python tests/fuzz/fuzz_<name>.py FILE``.

atheris ships wheels for Linux on x86-64 only (elsewhere it would need clang and libFuzzer to
build): these tests are skipped where it is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (it has wheels for Linux x86-64 only)")

FUZZ = Path(__file__).resolve().parent / "fuzz"
#: Inputs each harness runs here: a few seconds each.
RUNS = {"fuzz_frames": 30_000, "fuzz_rpc": 60_000, "fuzz_ingest": 60_000, "fuzz_templates": 4_000,
        "fuzz_h2client": 6_000}


def fuzz(harness: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [sys.executable, str(harness), str(corpus), f"-artifact_prefix={tmp_path}/",
               f"-seed={os.environ.get('PIGEON_FUZZ_SEED', '1')}", "-timeout=10", "-rss_limit_mb=2048",
               "-max_total_time=30", "-print_final_stats=1", *options]
    # The Python traceback of a crash goes to stdout, libFuzzer's report to stderr: both, in order.
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=tmp_path)


def test_every_harness_is_run_here() -> None:
    assert {p.stem for p in FUZZ.glob("fuzz_*.py")} == set(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_harness_finds_nothing(name: str, tmp_path: Path) -> None:
    runs = int(RUNS[name] * float(os.environ.get("PIGEON_FUZZ_SCALE", "1")))
    result = fuzz(FUZZ / f"{name}.py", tmp_path, f"-runs={runs}")
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    tail = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("INFO: Instrumenting"))[-6000:]
    assert result.returncode == 0 and not crashes, f"{name} failed ({crashes} in {tmp_path}):\n{tail}"
    assert "Done " in result.stdout and "stat::number_of_executed_units" in result.stdout, tail


def test_a_harness_that_breaks_an_invariant_fails(tmp_path: Path) -> None:
    """The runner sees a crash: a harness whose invariant breaks on one of its seeds."""
    harness = tmp_path / "fuzz_broken.py"
    harness.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(FUZZ)!r})\n"
        "from _fuzz import bounded, main\n"
        "@bounded(1.0)\n"
        "def test(data):\n"
        "    assert not data.startswith(b'boom'), 'broken'\n"
        "main(test, [b'fine', b'boom!'])\n"
    )
    result = fuzz(harness, tmp_path, "-runs=100")
    assert result.returncode != 0
    assert "AssertionError: broken" in result.stdout
    [crash] = [p for p in tmp_path.iterdir() if p.name.startswith("crash-")]
    assert crash.read_bytes() == b"boom!"
