"""Journey definitions, checked whole before they are published.

A journey arrives as a `protocols.api.JourneySpec` (a YAML or JSON file the CLI reads, or a
``journeys.publish`` request): msgspec has checked each field's type and form. `check` then
refuses what could not run, naming the node and the field (``$.journey.nodes[2].next``): a
target that no node has, a node no profile can reach, a loop of activities with no wait in it
(an instance would spin), a reaction to a push the journey does not send before it, a wait
with two ways of waiting, percentages that do not add up to 100, a time zone that does not
exist, an expression or template that does not compile, and a push of a message that is not
published (its version is pinned then: a later edit of the message does not change the
journey). The engine runs what `check` let through.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import msgspec
import msgspec.structs

from protocols import api
from server.runtime.errors import InvalidArgument, NotFound
from server.templates import compile_condition, compile_field

__all__ = ["MAX_WAIT_US", "MAX_TIMEOUT_US", "duration_us", "check", "targets"]

_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000, "w": 604_800_000_000}
_PART = re.compile(r"([0-9]+)([smhdw])")
#: The longest wait (a wait, a reaction's timeout), as the journey optimizer allows.
MAX_WAIT_US = 90 * _UNIT_US["d"]
#: The longest an instance may run.
MAX_TIMEOUT_US = 91 * _UNIT_US["d"]
#: The shortest period of a recurring read audience.
_MIN_EVERY_US = _UNIT_US["h"]

#: ``messages(name, version)``: the version of message ``name`` that a push sends (the given
#: one, or the latest when None), or None when there is no such version.
Messages = Callable[[str, "int | None"], "int | None"]


def duration_us(text: str) -> int:
    """A duration (``1d12h``: `api.DURATION_PATTERN`) in µs."""
    return sum(int(n) * _UNIT_US[unit] for n, unit in _PART.findall(text))


def targets(node: api.JourneyNode) -> Iterator[tuple[str, str]]:
    """Where ``node`` may send an instance on: ``(field, node id)``."""
    if isinstance(node, api.ConditionNode):
        for i, branch in enumerate(node.branches):
            yield f"branches[{i}].next", branch.next
        if node.otherwise is not None:
            yield "otherwise", node.otherwise
    elif isinstance(node, api.SplitNode):
        for i, path in enumerate(node.paths):
            yield f"paths[{i}].next", path.next
    else:
        for field in ("next", "on_error", "timeout_next"):
            target = getattr(node, field, None)
            if target is not None:
                yield field, target


def check(spec: api.JourneySpec, messages: Messages, *, now_us: int) -> api.JourneySpec:
    """``spec`` as it will run, each push's message version pinned; raises `InvalidArgument`
    (or `NotFound` for a message that is not published) naming what is wrong."""
    _check_properties(spec, now_us)
    index = _check_graph(spec)
    nodes = [_check_node(i, node, index, spec, messages) for i, node in enumerate(spec.nodes)]
    return msgspec.structs.replace(spec, nodes=nodes)


def _where(i: int, node: api.JourneyNode, field: str = "") -> str:
    return f"$.journey.nodes[{i}]" + (f".{field}" if field else "")


def _refuse(path: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{path}: {message}", field=path)


def _check_graph(spec: api.JourneySpec) -> dict[str, int]:
    """Node ids unique, targets known, every node reachable, no loop without a wait."""
    index: dict[str, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.id in index:
            raise _refuse(_where(i, node, "id"), f"node {node.id!r} is already the id of nodes[{index[node.id]}]")
        index[node.id] = i
    for i, node in enumerate(spec.nodes):
        for field, target in targets(node):
            if target not in index:
                raise _refuse(_where(i, node, field), f"node {node.id!r} goes to {target!r}, which no node is")
    reached = _reached(spec, index, 0)
    for i, node in enumerate(spec.nodes):
        if i not in reached:
            raise _refuse(_where(i, node), f"node {node.id!r} cannot be reached from the first node "
                                           f"({spec.nodes[0].id!r}): remove it or send profiles to it")
    loop = _instant_loop(spec, index)
    if loop:
        first = loop[0]
        raise _refuse(_where(first, spec.nodes[first]), "these nodes make a loop with no wait or reaction in it, "
                      f"which an instance would go round for ever: {' -> '.join(spec.nodes[i].id for i in loop)}")
    return index


def _reached(spec: api.JourneySpec, index: dict[str, int], start: int) -> set[int]:
    seen = {start}
    todo = [start]
    while todo:
        for _, target in targets(spec.nodes[todo.pop()]):
            j = index[target]
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _instant_loop(spec: api.JourneySpec, index: dict[str, int]) -> list[int]:
    """A cycle through nodes that do not wait (depth-first, with colours), or []."""
    waits = (api.WaitNode, api.ReactionNode)
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    path: list[int] = []

    def visit(i: int) -> list[int]:
        state[i] = 1
        path.append(i)
        for _, target in targets(spec.nodes[i]):
            j = index[target]
            if isinstance(spec.nodes[j], waits):
                continue
            if state.get(j) == 1:
                return path[path.index(j):] + [j]
            if j not in state and (found := visit(j)):
                return found
        path.pop()
        state[i] = 2
        return []

    for i, node in enumerate(spec.nodes):
        if i not in state and not isinstance(node, waits) and (found := visit(i)):
            return found
    return []


def _check_properties(spec: api.JourneySpec, now_us: int) -> None:
    _check_entry(spec.entry)
    try:
        zoneinfo.ZoneInfo(spec.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _refuse("$.journey.timezone", f"{spec.timezone!r} is not a time zone (an IANA name such as "
                                            "'Europe/Paris' or 'UTC')") from None
    if spec.start is not None and spec.end is not None and spec.end <= spec.start:
        raise _refuse("$.journey.end", "the end must come after the start")
    if spec.end is not None and _us(spec.end) <= now_us:
        raise _refuse("$.journey.end", "the end has passed: nobody could enter")
    if not 0 < duration_us(spec.timeout) <= MAX_TIMEOUT_US:
        raise _refuse("$.journey.timeout", "a journey's timeout is at most 91 days (91d) and more than 0")
    if spec.reentrance is not None and spec.reentrance.after is not None and not spec.reentrance.allowed:
        raise _refuse("$.journey.reentrance.after", "a wait before re-entering needs allowed: true")
    for i, criterion in enumerate(spec.exit):
        _check_criterion(criterion, f"$.journey.exit[{i}]")
    if spec.goal is not None:
        _check_criterion(spec.goal, "$.journey.goal")
    if spec.quiet_hours is not None and spec.quiet_hours.start == spec.quiet_hours.end:
        raise _refuse("$.journey.quiet_hours.end", "quiet hours that start and end at the same time are empty")
    per = [cap.per for cap in spec.caps]
    if len(set(per)) != len(per):
        raise _refuse("$.journey.caps", "one cap per period (hour, day, week, month) at most")


def _us(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


def _check_entry(entry: api.JourneyEntry) -> None:
    kinds = [name for name, given in (("event", entry.event is not None), ("audience", entry.audience is not None),
                                      ("read", entry.read)) if given]
    if len(kinds) != 1:
        raise _refuse("$.journey.entry", "give exactly one way in: event (a unitary event), audience (audience "
                                         f"qualification) or read: true (a read audience); found {kinds or 'none'}")
    if entry.audience is not None:
        _compile("$.journey.entry.audience", entry.audience)
        if entry.condition is not None:
            raise _refuse("$.journey.entry.condition", "an audience entry's condition is the audience itself")
    elif entry.on != "enter":
        raise _refuse("$.journey.entry.on", "on: exit is for an audience entry")
    if not entry.read and (entry.at is not None or entry.every is not None):
        raise _refuse("$.journey.entry.every" if entry.every else "$.journey.entry.at",
                      "at and every are for a read audience (read: true)")
    if entry.every is not None and duration_us(entry.every) < _MIN_EVERY_US:
        raise _refuse("$.journey.entry.every", "a read audience runs at most once an hour (every: 1h or more)")
    if entry.condition is not None:
        _compile("$.journey.entry.condition", entry.condition)


def _check_criterion(criterion: api.Criterion, path: str) -> None:
    if criterion.event is None and criterion.condition is None:
        raise _refuse(path, "give an event, a condition, or both")
    if criterion.condition is not None:
        _compile(f"{path}.condition", criterion.condition)


def _compile(path: str, source: str) -> None:
    compile_condition(path, source)  # raises TemplateSyntax naming the path, line and column


def _check_node(i: int, node: api.JourneyNode, index: dict[str, int], spec: api.JourneySpec,
                messages: Messages) -> api.JourneyNode:
    if isinstance(node, api.PushNode):
        version = messages(node.message, node.version)
        if version is None:
            what = f"version {node.version} of " if node.version is not None else ""
            raise NotFound(f"{_where(i, node, 'message')}: node {node.id!r} pushes {what}message {node.message!r}, "
                           "which is not published (pigeon messages publish FILE)", field=_where(i, node, "message"))
        return msgspec.structs.replace(node, version=version)
    if isinstance(node, api.ConditionNode):
        for b, branch in enumerate(node.branches):
            _compile(_where(i, node, f"branches[{b}].when"), branch.when)
    elif isinstance(node, api.SplitNode):
        if sum(path.percent for path in node.paths) != 100:
            raise _refuse(_where(i, node, "paths"), f"node {node.id!r}: the percentages add up to "
                                                    f"{sum(p.percent for p in node.paths)}, not 100")
    elif isinstance(node, api.WaitNode):
        _check_wait(i, node)
    elif isinstance(node, api.ReactionNode):
        _check_reaction(i, node, index, spec)
    elif isinstance(node, api.UpdateNode):
        for path, source in _strings(node.patch, _where(i, node, "patch")):
            compile_field(path, source)
    return node


def _check_wait(i: int, node: api.WaitNode) -> None:
    ways = [name for name in ("duration", "until", "time") if getattr(node, name) is not None]
    if len(ways) != 1:
        raise _refuse(_where(i, node), f"wait {node.id!r}: give exactly one of duration, until and time "
                                       f"(found {ways or 'none'})")
    if node.days and node.time is None:
        raise _refuse(_where(i, node, "days"), "days go with time (wait until a local time on these days)")
    if node.duration is not None and not 0 < duration_us(node.duration) <= MAX_WAIT_US:
        raise _refuse(_where(i, node, "duration"), "a wait lasts more than 0 and at most 90 days (90d)")
    if node.until is not None:
        _compile(_where(i, node, "until"), node.until)


def _check_reaction(i: int, node: api.ReactionNode, index: dict[str, int], spec: api.JourneySpec) -> None:
    if (node.push is None) == (node.event is None):
        raise _refuse(_where(i, node), f"reaction {node.id!r}: give either push (react to an open or an action "
                                       "on an earlier push) or event (react to an event)")
    if not 0 < duration_us(node.timeout) <= MAX_WAIT_US:
        raise _refuse(_where(i, node, "timeout"), "a reaction's timeout is more than 0 and at most 90 days (90d)")
    if node.push is not None:
        j = index.get(node.push)
        if j is None or not isinstance(spec.nodes[j], api.PushNode):
            raise _refuse(_where(i, node, "push"), f"reaction {node.id!r} reacts to {node.push!r}, which is not a "
                                                   "push node of this journey")
        if i not in _reached(spec, index, j):
            raise _refuse(_where(i, node, "push"), f"reaction {node.id!r} comes before push {node.push!r}: "
                                                   "it can only react to a push sent on the way to it")
        if node.on == "opened" and node.action is not None:
            raise _refuse(_where(i, node, "action"), "an action id goes with on: action")
    elif node.action is not None or node.on != "opened":
        raise _refuse(_where(i, node, "on"), "on and action go with push (an event reaction has its event)")
    if node.condition is not None:
        _compile(_where(i, node, "condition"), node.condition)


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """The strings in a patch (each a template), with their paths."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from _strings(item, f"{path}[{n}]")
