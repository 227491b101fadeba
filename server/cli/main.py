"""The ``pigeon`` command line.

``pigeon serve`` runs a server; every other command is a client of one (``--server``, or
``PIGEON_SERVER``, default 127.0.0.1:7600) and prints a readable summary, or the response
as JSON with ``--json`` (every field, defaults included). Options common to the client
commands may come before or after the command. Exit status: 0 on success; 1 when the server
could not do it (not found, refused for a reason other than the input, a notification not
sent) or could not be reached; 2 for bad input, whoever found it (a usage error, a file or
value the CLI or the server refused: ``INVALID_ARGUMENT``) and for a configuration error;
141 when the output was closed early (``| head``), quietly, as other Unix tools do.
Bare ``pigeon`` (or a command group without its subcommand) prints its help, with status 2.

The package, by what each module does: `server.cli.parser` the argument tree (``COMMANDS``,
the CLI command of every protocol method), `server.cli.commands` the client commands,
`server.cli.connect` reaching the server, `server.cli.inputs` reading flags and files,
`server.cli.output` what is printed, `server.cli.demo` ``pigeon demo``; this module runs a
command and turns its errors into a line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from protocols.errors import CallError, PigeonProtocolError, Status

from server.cli.connect import Unreachable, run_client
from server.cli.demo import run_demo
from server.cli.inputs import UsageError
from server.cli.parser import build_parser
from server.runtime.config import load_config
from server.runtime.errors import ConfigError, RestartIntensityExceeded, ServerError

__all__ = ["main"]

log = logging.getLogger("pigeon")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock-apns"]:  # its own options, parsed by the mock
        from plugins.apns.mock import main as mock_main

        return mock_main(argv[1:])
    if argv[:1] == ["mock-fcm"]:
        from plugins.fcm.mock import main as fcm_mock_main

        return fcm_mock_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.action is None and args.command not in ("serve", "demo"):
        args.group.print_help()  # bare `pigeon`, or a group without its subcommand
        return 2
    try:
        try:
            code = _run(args)
        except SystemExit as exc:  # a command's own status (push send: 1 unless all were sent)
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        return _output_closed()
    except BaseExceptionGroup as group:  # from inside a nursery (the demo's)
        if group.split(BrokenPipeError)[1] is not None:
            raise
        return _output_closed()


def _output_closed() -> int:
    """Whoever read our output has gone (`pigeon events list ... | head`): stop quietly, as Unix
    tools do, and point stdout at /dev/null so that the interpreter's last flush does not
    complain (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    """Run the command; errors become a line on stderr and an exit status (see the module's docstring)."""
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
            return trio.run(run_demo, args.data, args.profiles)
        trio.run(run_client, args)
        return 0
    except (UsageError, ConfigError) as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 1
    except CallError as exc:
        print(f"pigeon: {_call_error_text(exc, args)}", file=sys.stderr)
        return 2 if exc.status is Status.INVALID_ARGUMENT else 1
    except Unreachable as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except (PigeonProtocolError, OSError) as exc:
        print(f"pigeon: cannot talk to the server at {getattr(args, 'server', '?')}: {exc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"pigeon: no answer from {args.server} within {args.timeout:g}s", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    """``pigeon serve``: run the server until it is stopped; 1 if it gave up (a child failing too often)."""
    from server.runtime.app import serve

    overrides: dict[str, Any] = {}
    if args.data:
        overrides["data"] = args.data
    if args.listen:
        overrides["listen"] = args.listen
    if args.log_level:
        overrides["log_level"] = args.log_level
    config = load_config(args.config, env=os.environ, overrides=overrides)
    if args.ready_file and not Path(args.ready_file).absolute().parent.is_dir():
        raise UsageError(f"--ready-file {args.ready_file}: its folder does not exist")
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return trio.run(partial(serve, config, ready_file=args.ready_file))
    except BaseExceptionGroup as group:
        match, _ = group.split((RestartIntensityExceeded, ServerError))
        if match is None:
            raise
        first: BaseException = match
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        log.critical("pigeon is exiting: %s", first)
        return 1


def _call_error_text(exc: CallError, args: argparse.Namespace) -> str:
    """The server's error; when it is about a field that came from a flag, it names the flag
    and its value (``--p8 AuthKey.p8: ...``) instead of the request's field (``$.auth.key_pem``)."""
    field = exc.field or ""
    for prefix, dest in getattr(args, "flags", {}).items():
        value = getattr(args, dest, None)
        if value is None or not (field == prefix or field.startswith((prefix + ".", prefix + "["))):
            continue
        flag = "--" + dest.replace("_", "-")
        if len(value) <= 200 and "\n" not in value:  # a file name, an id; not a whole JSON document
            flag += f" {value}"
        inner = field[len(prefix):].lstrip(".")
        return f"{flag}: " + (f"{inner}: " if inner else "") + exc.message.removeprefix(f"{field}: ")
    return f"{exc.status}: {exc.message}"

