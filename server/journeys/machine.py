"""The journey state machine: what one instance does when something happens to it.

Sans-IO: `advance` takes a compiled `Journey`, an `Instance` (where a profile is in it), what
happened (it entered, its timer fell due, an event of its profile arrived) and the time, and
returns the instance as it is now with the `Step` s it took, each with its virtual time, its
node and why. It reads nothing and writes nothing: what a push sends, what caps allow and
what a profile looks like come through a `World`, which the live engine backs with LMDB, the
outbox and the providers, and the simulator with a profile and a virtual clock. So the same
code runs live and simulated, and a trace of one equals the other's for the same inputs.

An instance moves through nodes that take no time (push, condition, split, update) until one
waits (wait, reaction, a push held by quiet hours) or it ends. A definition that `check`
accepted has no loop without a wait, so a walk is bounded by the number of nodes.
"""

from __future__ import annotations

import hashlib
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any, Protocol

import msgspec

from protocols import api
from server.journeys.definition import duration_us
from server.templates import Condition, TemplateError, compile_condition

__all__ = ["Journey", "Instance", "Step", "World", "Happened", "enter", "advance", "hold",
           "TEST_WAIT_US"]

#: In test mode a wait lasts at most this long.
TEST_WAIT_US = 10_000_000
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WAITS = (api.WaitNode, api.ReactionNode)


class Instance(msgspec.Struct, kw_only=True):
    """A profile in a journey (stored; see `server.journeys.instances`)."""

    journey: str
    version: int
    node: str
    entered_us: int
    #: When its timer falls due (0: none).
    wake_us: int = 0
    #: What it waits for at ``node``: "" (nothing: it ended or is moving), "wait",
    #: "reaction", "quiet" (a push held by quiet hours).
    waiting: str = ""
    #: The data of the event that made it enter (``event`` in its expressions).
    event: dict[str, Any] = {}
    #: The push nodes it went through, with the execution id their notifications carry.
    pushes: dict[str, str] = {}
    ended_us: int = 0
    #: Why it ended: end, no_branch, exit, timeout, stopped, error, quiet_hours.
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.ended_us != 0


class Step(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thing an instance did: at ``at_us``, at ``node``, a ``kind`` (enter, branch, split,
    wait, push, excluded, update, reaction, timeout, exit, goal, end), and why."""

    at_us: int
    node: str
    kind: str
    detail: str = ""
    #: For a push: the jobs it made (opaque to the machine), or the exclusion's reason.
    push: Any = None


@dataclass
class Happened:
    """What moves an instance: it enters (``kind`` "enter"), its timer falls due ("timer"),
    an event of its profile arrives ("event": ``type`` and ``data``), or its profile is
    written ("change": only an exit criterion's condition is checked)."""

    kind: str
    type: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class World(Protocol):
    """What the machine needs from outside: the live engine's or the simulator's."""

    def push(self, instance: Instance, node: api.PushNode, at_us: int) -> tuple[Any, str | None]:
        """Render and stage ``node`` 's message for the instance's profile: (what was made,
        None), or (a text saying why, the exclusion's reason code). It records the execution
        id its notifications carry in ``instance.pushes[node.id]`` (reactions match on it)."""

    def capped(self, caps: list[api.FrequencyCap], at_us: int) -> bool:
        """Whether the profile already had as many pushes as a cap allows."""

    def update(self, patch: dict[str, Any]) -> None:
        """Merge ``patch`` (rendered) into the profile's attributes."""


class Journey:
    """A published version of a journey, compiled for the machine."""

    def __init__(self, spec: api.JourneySpec, version: int, *, test: bool | None = None) -> None:
        self.spec = spec
        self.id = spec.id
        self.version = version
        self.test = spec.test if test is None else test
        self.nodes = {node.id: node for node in spec.nodes}
        self.first = spec.nodes[0].id
        self.timezone = zoneinfo.ZoneInfo(spec.timezone)
        self.timeout_us = duration_us(spec.timeout)
        self.conditions: dict[str, Condition] = {}
        for i, node in enumerate(spec.nodes):
            for name, source in _expressions(node):
                self.conditions[f"{node.id}.{name}"] = compile_condition(f"$.journey.nodes[{i}].{name}", source)
        for i, criterion in enumerate(spec.exit):
            if criterion.condition is not None:
                self.conditions[f"exit[{i}]"] = compile_condition(f"$.journey.exit[{i}].condition", criterion.condition)
        if spec.goal is not None and spec.goal.condition is not None:
            self.conditions["goal"] = compile_condition("$.journey.goal.condition", spec.goal.condition)
        if spec.entry.condition is not None:
            self.conditions["entry"] = compile_condition("$.journey.entry.condition", spec.entry.condition)
        if spec.entry.audience is not None:
            self.conditions["audience"] = compile_condition("$.journey.entry.audience", spec.entry.audience)

    def wait_us(self, us: int) -> int:
        """A wait's length, shortened in test mode."""
        return min(us, TEST_WAIT_US) if self.test else us

    def local(self, profile: dict[str, Any], at_us: int) -> datetime:
        """``at_us`` in the profile's time zone (its attribute), else the journey's."""
        zone = self.timezone
        name = profile.get(self.spec.profile_timezone) if self.spec.profile_timezone else None
        if isinstance(name, str):
            try:
                zone = zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                pass  # a profile's bad time zone: the journey's
        return datetime.fromtimestamp(at_us / 1e6, zone)


def _expressions(node: api.JourneyNode) -> list[tuple[str, str]]:
    if isinstance(node, api.ConditionNode):
        return [(f"branches[{i}].when", b.when) for i, b in enumerate(node.branches)]
    if isinstance(node, api.WaitNode) and node.until is not None:
        return [("until", node.until)]
    if isinstance(node, api.ReactionNode) and node.condition is not None:
        return [("condition", node.condition)]
    return []


def enter(journey: Journey, happened: Happened, at_us: int) -> Instance:
    """A new instance at the journey's first node (not moved yet: `advance` it)."""
    return Instance(journey=journey.id, version=journey.version, node=journey.first, entered_us=at_us,
                    event=dict(happened.data) if happened.kind == "event" else {})


def advance(journey: Journey, instance: Instance, happened: Happened, at_us: int, profile: dict[str, Any],
            world: World) -> tuple[Instance, list[Step]]:
    """What ``happened`` does to ``instance`` at ``at_us`` (see the module docstring)."""
    steps: list[Step] = []
    inst = msgspec.structs.replace(instance, pushes=dict(instance.pushes))
    if inst.ended:
        return inst, steps
    if happened.kind == "enter":
        steps.append(Step(at_us=at_us, node=inst.node, kind="enter", detail=happened.type or "entered"))
    elif happened.kind == "event":
        if _goal(journey, happened, profile, inst, at_us):
            steps.append(Step(at_us=at_us, node=inst.node, kind="goal", detail=happened.type))
        reason = _exit(journey, happened, profile, inst, at_us)
        if reason is not None:
            return _end(inst, steps, at_us, "exit", reason)
    elif happened.kind == "change":  # the profile was written: an exit condition may now hold
        reason = _exit(journey, happened, profile, inst, at_us)
        return _end(inst, steps, at_us, "exit", reason) if reason is not None else (inst, steps)
    if at_us - inst.entered_us >= journey.timeout_us:
        return _end(inst, steps, at_us, "timeout", f"running for {journey.spec.timeout}")
    target = _resume(journey, inst, happened, at_us, profile, steps)
    if target is None:
        return inst, steps  # still waiting (an event it does not react to)
    inst, steps = _walk(journey, inst, target, at_us, profile, world, steps)
    if inst.waiting:  # its timer falls due at the journey's timeout at the latest, which ends it then
        deadline = inst.entered_us + journey.timeout_us
        inst.wake_us = min(inst.wake_us, deadline) if inst.wake_us else deadline
    return inst, steps


def hold(journey: Journey, instance: Instance, happened: Happened, at_us: int, profile: dict[str, Any],
         world: World) -> tuple[Instance, list[Step]]:
    """What an event does to ``instance`` while its journey is paused: its goal and exit
    criteria apply (a conversion is one whatever the journey's state; an exit event takes the
    profile out), but it does not move (a reaction does not happen; the event is not kept)."""
    steps: list[Step] = []
    inst = msgspec.structs.replace(instance, pushes=dict(instance.pushes))
    if inst.ended or happened.kind not in ("event", "change"):
        return inst, steps
    if _goal(journey, happened, profile, inst, at_us):
        steps.append(Step(at_us=at_us, node=inst.node, kind="goal", detail=happened.type))
    reason = _exit(journey, happened, profile, inst, at_us)
    if reason is not None:
        return _end(inst, steps, at_us, "exit", reason)
    return inst, steps


def _context(journey: Journey, inst: Instance, profile: dict[str, Any], at_us: int,
             event: dict[str, Any] | None = None) -> dict[str, Any]:
    local = journey.local(profile, at_us)
    return {
        "profile": profile, "event": inst.event if event is None else event,
        "journey": {"id": journey.id, "version": journey.version, "node": inst.node},
        "now": {"hour": local.hour, "minute": local.minute, "weekday": _WEEKDAYS[local.weekday()],
                "date": local.date().isoformat()},
    }


def _goal(journey: Journey, happened: Happened, profile: dict[str, Any], inst: Instance, at_us: int) -> bool:
    goal = journey.spec.goal
    if goal is None or goal.event != happened.type:
        return False
    condition = journey.conditions.get("goal")
    return condition is None or _holds(condition, _context(journey, inst, profile, at_us, happened.data))


def _exit(journey: Journey, happened: Happened, profile: dict[str, Any], inst: Instance, at_us: int) -> str | None:
    """Why an exit criterion takes the instance out on this event, or None."""
    for i, criterion in enumerate(journey.spec.exit):
        if criterion.event is not None and criterion.event != happened.type:
            continue
        condition = journey.conditions.get(f"exit[{i}]")
        if condition is None or _holds(condition, _context(journey, inst, profile, at_us, happened.data)):
            return f"exit[{i}]: {criterion.event or criterion.condition}"
    return None


def _holds(condition: Condition, context: dict[str, Any]) -> bool:
    try:
        return condition.test(context)
    except TemplateError:
        return False


def _resume(journey: Journey, inst: Instance, happened: Happened, at_us: int, profile: dict[str, Any],
            steps: list[Step]) -> str | None:
    """The node the instance goes to now, or None to stay where it waits."""
    node = journey.nodes[inst.node]
    if happened.kind == "enter" or not inst.waiting:
        return inst.node
    if inst.waiting == "quiet":  # its push, held until the quiet hours ended
        return inst.node if happened.kind == "timer" else None
    if inst.waiting == "wait":
        if happened.kind != "timer" or at_us < inst.wake_us:
            return None
        steps.append(Step(at_us=at_us, node=node.id, kind="wait", detail="waited"))
        return _after(node)
    assert isinstance(node, api.ReactionNode)
    if happened.kind == "timer":
        if at_us < inst.wake_us:
            return None
        steps.append(Step(at_us=at_us, node=node.id, kind="timeout", detail=f"no reaction in {node.timeout}"))
        return node.timeout_next or ""
    if not _reacts(journey, node, inst, happened, profile, at_us):
        return None
    steps.append(Step(at_us=at_us, node=node.id, kind="reaction", detail=happened.type))
    return node.next or ""


def _after(node: api.JourneyNode) -> str:
    return getattr(node, "next", None) or ""


def _reacts(journey: Journey, node: api.ReactionNode, inst: Instance, happened: Happened,
            profile: dict[str, Any], at_us: int) -> bool:
    if node.event is not None:
        if happened.type != node.event:
            return False
    else:
        wanted = "pushTracking.applicationOpened" if node.on == "opened" else "pushTracking.customAction"
        envelope = _envelope(happened.data)
        execution = inst.pushes.get(node.push or "")
        if happened.type != wanted or execution is None or envelope.get("x") != execution:
            return False
        if envelope.get("n", node.push) != node.push:  # another push of the same execution
            return False
        if node.action is not None and happened.data.get("actionId") != node.action:
            return False
    condition = journey.conditions.get(f"{node.id}.condition")
    return condition is None or _holds(condition, _context(journey, inst, profile, at_us, happened.data))


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    """The tracking envelope of an interaction (`server.reports.interactions`)."""
    envelope = data.get("_p")
    if isinstance(envelope, str):
        try:
            envelope = msgspec.json.decode(envelope)
        except msgspec.DecodeError:
            return {}
    return envelope if isinstance(envelope, dict) else {}


def _end(inst: Instance, steps: list[Step], at_us: int, reason: str, detail: str) -> tuple[Instance, list[Step]]:
    steps.append(Step(at_us=at_us, node=inst.node, kind="exit" if reason != "end" else "end", detail=detail))
    inst.ended_us, inst.reason, inst.waiting, inst.wake_us = at_us, reason, "", 0
    return inst, steps


def _walk(journey: Journey, inst: Instance, target: str, at_us: int, profile: dict[str, Any], world: World,
          steps: list[Step]) -> tuple[Instance, list[Step]]:
    """Move through the nodes that take no time, from ``target``, until one waits or it ends."""
    inst.waiting, inst.wake_us = "", 0
    for _ in range(len(journey.nodes) + 1):
        if not target:
            reason = inst.reason or "end"
            return _end(inst, steps, at_us, reason, "no next node" if reason == "end" else reason)
        inst.node = target
        node = journey.nodes[target]
        if isinstance(node, api.EndNode):
            return _end(inst, steps, at_us, "end", "end node")
        try:
            moved = _do(journey, inst, node, at_us, profile, world, steps)
        except TemplateError as exc:  # this profile's data breaks an expression: it leaves, the others go on
            return _end(inst, steps, at_us, "error", exc.message)
        if moved is None:
            return inst, steps  # it waits here
        target = moved
    raise AssertionError(f"journey {journey.id} v{journey.version}: a walk did not stop")  # check() forbids it


def _do(journey: Journey, inst: Instance, node: api.JourneyNode, at_us: int, profile: dict[str, Any],
        world: World, steps: list[Step]) -> str | None:
    """Carry out ``node``: the node to go to next ("" to end), or None when it waits here."""
    if isinstance(node, api.PushNode):
        return _push(journey, inst, node, at_us, profile, world, steps)
    if isinstance(node, api.ConditionNode):
        context = _context(journey, inst, profile, at_us)
        for i, branch in enumerate(node.branches):
            if journey.conditions[f"{node.id}.branches[{i}].when"].test(context):
                steps.append(Step(at_us=at_us, node=node.id, kind="branch", detail=f"branches[{i}]: {branch.when}"))
                return branch.next
        steps.append(Step(at_us=at_us, node=node.id, kind="branch", detail="otherwise"))
        if node.otherwise is None:
            return _reason(inst, "no_branch")
        return node.otherwise
    if isinstance(node, api.SplitNode):
        slot = _slot(journey.id, profile)
        total = 0
        for i, path in enumerate(node.paths):
            total += path.percent
            if slot < total:
                steps.append(Step(at_us=at_us, node=node.id, kind="split", detail=f"paths[{i}] ({path.percent}%)"))
                return path.next
        raise AssertionError("percentages add up to 100")  # check() made sure
    if isinstance(node, api.UpdateNode):
        world.update(node.patch)
        steps.append(Step(at_us=at_us, node=node.id, kind="update", detail=", ".join(sorted(node.patch))))
        return node.next or ""
    _wait(journey, inst, node, at_us, profile, steps)
    return None


def _reason(inst: Instance, reason: str) -> str:
    inst.reason = reason
    return ""


def _slot(journey: str, profile: dict[str, Any]) -> int:
    """0-99, the same for a profile and a journey every time."""
    who = str(profile.get("identities", [""])[0] if profile.get("identities") else "")
    return int.from_bytes(hashlib.sha256(f"{journey}\x00{who}".encode()).digest()[:8], "big") % 100


def _wait(journey: Journey, inst: Instance, node: api.JourneyNode, at_us: int, profile: dict[str, Any],
          steps: list[Step]) -> None:
    if isinstance(node, api.ReactionNode):
        inst.waiting, inst.wake_us = "reaction", at_us + journey.wait_us(duration_us(node.timeout))
        steps.append(Step(at_us=at_us, node=node.id, kind="wait", detail=f"for a reaction until {_iso(inst.wake_us)}"))
        return
    assert isinstance(node, api.WaitNode)
    wake = _wake(journey, node, inst, at_us, profile)
    inst.waiting, inst.wake_us = "wait", max(wake, at_us)
    steps.append(Step(at_us=at_us, node=node.id, kind="wait", detail=f"until {_iso(inst.wake_us)}"))


def _wake(journey: Journey, node: api.WaitNode, inst: Instance, at_us: int, profile: dict[str, Any]) -> int:
    if node.duration is not None:
        return at_us + journey.wait_us(duration_us(node.duration))
    if node.until is not None:
        value = journey.conditions[f"{node.id}.until"].value(_context(journey, inst, profile, at_us))
        when = _moment(value)
        if when is None:
            raise TemplateError(f"wait {node.id!r}: until gave {str(value)[:100]!r}, not a date-time",
                                field=f"{node.id}.until")
        return min(when, at_us + journey.wait_us(when - at_us))
    assert node.time is not None
    return _next_local_time(journey, profile, at_us, node.time, node.days)


def _moment(value: Any) -> int | None:
    """A date-time value (a datetime, an RFC 3339 string, epoch seconds) in µs."""
    if isinstance(value, datetime):
        when = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1_000_000)
    else:
        return None
    return int(when.timestamp() * 1_000_000)


def _next_local_time(journey: Journey, profile: dict[str, Any], at_us: int, time: str, days: Sequence[str]) -> int:
    """The next moment after ``at_us`` when the profile's clock shows ``time`` on one of ``days``."""
    local = journey.local(profile, at_us)
    hour, minute = int(time[:2]), int(time[3:])
    for ahead in range(8):
        day = (local + timedelta(days=ahead)).date()
        candidate = datetime(day.year, day.month, day.day, hour, minute, tzinfo=local.tzinfo)
        if candidate <= local or (days and _WEEKDAYS[candidate.weekday()] not in days):
            continue
        return int(candidate.timestamp() * 1_000_000)
    raise AssertionError("a week holds every weekday")


def _quiet_until(journey: Journey, profile: dict[str, Any], at_us: int) -> int | None:
    """The end of the quiet hours the profile's clock is in at ``at_us``, or None."""
    quiet = journey.spec.quiet_hours
    if quiet is None:
        return None
    local = journey.local(profile, at_us)
    now = local.hour * 60 + local.minute
    start = int(quiet.start[:2]) * 60 + int(quiet.start[3:])
    end = int(quiet.end[:2]) * 60 + int(quiet.end[3:])
    inside = start <= now < end if start < end else (now >= start or now < end)
    if not inside:
        return None
    return _next_local_time(journey, profile, at_us, quiet.end, [])


def _push(journey: Journey, inst: Instance, node: api.PushNode, at_us: int, profile: dict[str, Any], world: World,
          steps: list[Step]) -> str | None:
    quiet_end = _quiet_until(journey, profile, at_us)
    if quiet_end is not None:
        assert journey.spec.quiet_hours is not None
        if journey.spec.quiet_hours.action == "discard":
            steps.append(Step(at_us=at_us, node=node.id, kind="excluded", push="QuietHours",
                              detail="quiet hours: discarded"))
            return _reason(inst, "quiet_hours")
        inst.waiting, inst.wake_us = "quiet", quiet_end
        steps.append(Step(at_us=at_us, node=node.id, kind="wait", detail=f"quiet hours until {_iso(quiet_end)}"))
        return None
    if journey.spec.caps and world.capped(journey.spec.caps, at_us):
        steps.append(Step(at_us=at_us, node=node.id, kind="excluded", push="FrequencyCapped",
                          detail="frequency cap reached"))
        return node.on_error or node.next or ""
    made, excluded = world.push(inst, node, at_us)
    if excluded is not None:
        steps.append(Step(at_us=at_us, node=node.id, kind="excluded", push=excluded, detail=str(made or excluded)))
        return node.on_error or node.next or ""
    steps.append(Step(at_us=at_us, node=node.id, kind="push", push=made, detail=f"{node.message} v{node.version}"))
    return node.next or ""


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")

