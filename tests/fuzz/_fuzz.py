"""What the atheris harnesses share: the seed corpus, the dictionary and libFuzzer's options.

A harness calls `main(test_one_input, seeds, tokens)` under ``if __name__ == "__main__"``.
Without a corpus folder on the command line it fuzzes ``tests/fuzz/corpus/<harness>/`` (made
and seeded on first use, ignored by git), so that what one run found is where the next run
starts; with one, it uses that (tests/test_atheris.py gives each run a fresh one); with files,
it replays them (a crash: ``python tests/fuzz/fuzz_frames.py crash-...``). Without ``-dict=``,
the harness's ``tokens`` are written beside the corpus folder as a libFuzzer dictionary and used.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent


class TooSlow(AssertionError):
    """One input took longer than its bound."""


def bounded(seconds: float) -> Callable[[Callable[[bytes], None]], Callable[[bytes], None]]:
    """Wrap a harness's ``TestOneInput`` so that an input taking more than ``seconds`` of
    CPU time fails (libFuzzer's ``-timeout`` is a backstop for an input that never ends)."""

    def wrap(test: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def timed(data: bytes) -> None:
            started = time.process_time()
            test(data)
            elapsed = time.process_time() - started
            if elapsed > seconds:
                raise TooSlow(f"{elapsed:.2f} s of CPU for one input of {len(data)} bytes (bound {seconds} s)")

        return timed

    return wrap


def _quoted(token: bytes) -> str:
    return '"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token) + '"'


def main(test_one_input: Callable[[bytes], None], seeds: Iterable[bytes], tokens: Iterable[bytes] = ()) -> None:
    name = Path(sys.argv[0]).stem
    argv = list(sys.argv)
    inputs = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not inputs:
        corpus = HERE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        argv.append(str(corpus))
    else:
        corpus = Path(inputs[0])
    if corpus.is_dir():  # else the inputs are files to replay (a crash)
        for seed in seeds:
            path = corpus / ("seed-" + hashlib.sha1(seed).hexdigest()[:16])
            if not path.exists():
                path.write_bytes(seed)
        tokens = list(tokens)
        if tokens and not any(arg.startswith("-dict=") for arg in argv):
            dictionary = corpus.parent / f"{name}.dict"
            dictionary.write_text("".join(f"{_quoted(t)}\n" for t in tokens))
            argv.append(f"-dict={dictionary}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
