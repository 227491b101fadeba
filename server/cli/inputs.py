"""What the CLI reads: JSON objects given as flags, times, files, YAML or JSON documents.

Bad input raises `UsageError` with a message that names the flag or the file: the CLI prints
it without a traceback and exits with status 2.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import msgspec

from protocols import api

__all__ = ["TOO_DEEP", "UsageError", "load_document", "make_event", "parse_json_object", "parse_time", "read_file"]


T = TypeVar("T")


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit status 2."""


#: What a parser's RecursionError means: input nested deeper than the parser follows.
TOO_DEEP = "nested too deeply (arrays or objects inside each other, hundreds of levels)"


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` (JSON, or ``@FILE``, or ``@-`` for stdin) as a JSON object; ``what`` names it in errors."""
    if text.startswith("@"):
        path = text[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {what} from {path!r}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} is {TOO_DEEP}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def parse_time(text: str | None, what: str) -> datetime | None:
    """An ISO 8601 time (UTC unless it says otherwise), or None for None."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an ISO 8601 time (2026-11-22T10:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def make_event(identity: str, type_: str, data: dict[str, Any], ts: datetime | None) -> api.Event:
    try:
        return msgspec.convert({"identity": identity, "type": type_, "data": data, "ts": ts}, api.Event)
    except msgspec.ValidationError as exc:
        raise UsageError(f"bad event: {api.describe_validation_error(exc)[0]}") from None


@overload
def read_file(path: str, what: str, *, binary: Literal[False] = False) -> str: ...
@overload
def read_file(path: str, what: str, *, binary: Literal[True]) -> bytes: ...
def read_file(path: str, what: str, *, binary: bool = False) -> str | bytes:
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _node_named(doc: Any, field: str | None) -> str:
    """`` (node 'wait')`` when ``field`` is within a node of a journey that has an id."""
    match = re.match(r"\$\.nodes\[(\d+)\]", field or "")
    if match and isinstance(doc, dict) and isinstance(doc.get("nodes"), list):
        nodes = doc["nodes"]
        i = int(match.group(1))
        if i < len(nodes) and isinstance(nodes[i], dict) and isinstance(nodes[i].get("id"), str):
            return f" (node {nodes[i]['id'][:100]!r})"
    return ""


def load_document(path: str, kind: type[T]) -> T:
    """A YAML or JSON file as ``kind``; errors name the file and the field."""
    import yaml

    text = read_file(path, "the file")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UsageError(f"{path}: {where}not valid YAML or JSON: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: {TOO_DEEP}") from None
    try:
        return msgspec.convert(doc, kind)
    except msgspec.ValidationError as exc:
        message, field = api.describe_validation_error(exc, kind)
        raise UsageError(f"{path}: {message}{_node_named(doc, field)}") from None
    except RecursionError:
        raise UsageError(f"{path}: {TOO_DEEP}") from None
