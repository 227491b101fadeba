"""Personalization: message fields as templates over a profile, an event and a journey.

Templates use Jinja2's syntax, run in its sandbox (`jinja2.sandbox.ImmutableSandboxedEnvironment`:
no attribute starting with ``_``, no file or import, nothing mutated)::

    Hi {{ profile.person.firstName | default("there") }}!
    {% if event.total > 100 %}Free shipping{% else %}{{ event.total | currency("EUR") }}{% endif %}
    {% for item in event.items[:3] %}{{ item.name }}{% if not loop.last %}, {% endif %}{% endfor %}

The names a template sees: ``profile`` (``attributes`` merged at the top, so
``profile.person.firstName`` works, plus ``profile.identities`` and ``profile.audiences``),
``event`` (the triggering event's data, plus ``event.type``), ``journey`` (its context) and
``message`` (``id``, ``version``).

A field is compiled once (`compile_field`; plain text without ``{{`` or ``{%`` is not a
template at all) and rendered per profile (`Field.render`). The names of one profile are best
given as a `Scope`, shared by every template rendered for it: Jinja's context is then made
once per profile instead of once per template (it is most of a small template's cost). Every render is bounded, so that
no template can run away or allocate without bound: at most `MAX_ITERATIONS` loop iterations
in all, `MAX_OUTPUT` characters out, `MAX_REPEAT` characters from ``*``, small exponents,
Python's recursion limit for macros. A template breaking a bound raises `TemplateLimit`.

Missing values: with ``on_missing="default"`` a missing value renders as nothing (or as its
``default(...)``); with ``"exclude"`` any missing value raises `MissingValue`, which the
pipeline reports as an exclusion of that profile. A template that does not compile raises
`TemplateSyntax` naming the line and column.

Helpers, beside Jinja's filters (``default``, ``upper``, ``lower``, ``title``, ``capitalize``,
``trim``, ``truncate``, ``replace``, ``join``, ``length``, ``round``, ``int``, ``float``,
``first``, ``last``, ``sort``, ...): ``currency(code, places=2)``, ``number(places=0)``
(thousands separated), ``date(format)`` (an ISO 8601 string, a datetime or epoch seconds;
strftime format, default ``%Y-%m-%d``), ``days_until`` / ``days_since``, ``url_encode``;
globals ``now()`` (UTC) and ``coalesce(a, b, ...)`` (the first value present).
"""

from __future__ import annotations

import json
import math
import operator
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import jinja2
import jinja2.nodes
import jinja2.sandbox
from jinja2.parser import Parser
from jinja2.runtime import Context

from ._errors import InvalidArgument

__all__ = [
    "Scope",
    "Field",
    "compile_field",
    "Condition",
    "compile_condition",
    "TemplateError",
    "TemplateSyntax",
    "TemplateLimit",
    "MissingValue",
    "MAX_ITERATIONS",
    "MAX_OUTPUT",
    "MAX_REPEAT",
]

#: Loop iterations per render, all loops together.
MAX_ITERATIONS = 10_000
#: Characters a render may produce.
MAX_OUTPUT = 16_384
#: Characters or items ``*`` may produce.
MAX_REPEAT = 16_384
_MAX_EXPONENT = 1_000

OnMissing = Literal["default", "exclude"]


class TemplateError(InvalidArgument):
    """A template cannot be used or rendered; names the field."""


class TemplateSyntax(TemplateError):
    """A template does not compile (the message names line and column)."""


class TemplateLimit(TemplateError):
    """A render broke a bound (iterations, output size, repetition)."""


class MissingValue(TemplateError):
    """A value the template uses is missing and the message excludes such profiles."""


class _Budget:
    """The iterations left to the render in progress (renders do not interleave: each runs
    to its end in one thread)."""

    iterations = MAX_ITERATIONS


_budget = _Budget()


def _iterate(iterable: Any) -> Any:
    for item in iterable:
        _budget.iterations -= 1
        if _budget.iterations < 0:
            raise TemplateLimit(f"the template loops more than {MAX_ITERATIONS} times")
        yield item


class _Bounded(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Profile data first: ``event.items`` is the event's items, not dict.items.
        if isinstance(obj, dict):
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
                raise TemplateLimit(f"exponent {right} is over {_MAX_EXPONENT}")
            return operator.pow(left, right)
        # "*": a string or list times a count
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                raise TemplateLimit(f"'*' would make {len(seq) * count} characters or items; at most {MAX_REPEAT}")
        return operator.mul(left, right)


def _bound_loops(node: jinja2.nodes.Node) -> None:
    """Route every ``for`` loop's iterable through `_iterate` (the iteration budget)."""
    for loop in node.find_all(jinja2.nodes.For):
        loop.iter = jinja2.nodes.Call(jinja2.nodes.Name("__pigeon_iterate", "load"), [loop.iter], [], None, None)


class _Missing(jinja2.ChainableUndefined):
    """A missing value: renders as nothing, chains (``a.b.c``), works with ``default``."""


class _MissingExcludes(jinja2.ChainableUndefined):
    """A missing value with ``on_missing="exclude"``: printing, testing or iterating it raises
    (`MissingValue`); ``default(...)`` still applies, even below a missing parent."""

    __str__ = __iter__ = __len__ = __bool__ = __eq__ = __ne__ = __contains__ = (  # type: ignore[assignment]
        jinja2.Undefined._fail_with_undefined_error
    )
    __hash__ = None  # type: ignore[assignment]


def _to_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _date(value: Any, format: str = "%Y-%m-%d") -> str:
    when = _to_datetime(value)
    return "" if when is None else when.strftime(format)


def _days_until(value: Any) -> int | str:
    when = _to_datetime(value)
    return "" if when is None else math.ceil((when - datetime.now(UTC)).total_seconds() / 86400)


def _days_since(value: Any) -> int | str:
    when = _to_datetime(value)
    return "" if when is None else math.floor((datetime.now(UTC) - when).total_seconds() / 86400)


def _number(value: Any, places: int = 0) -> str:
    try:
        return f"{float(value):,.{int(places)}f}"
    except (TypeError, ValueError):
        return ""


_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "CHF": "CHF "}


def _currency(value: Any, code: str = "USD", places: int = 2) -> str:
    amount = _number(value, places)
    if not amount:
        return ""
    symbol = _SYMBOLS.get(code.upper())
    return f"{symbol}{amount}" if symbol else f"{amount} {code.upper()}"


def _coalesce(*values: Any) -> Any:
    for value in values:
        if value is not None and not isinstance(value, jinja2.Undefined) and value != "":
            return value
    return ""


def _finalize(value: Any) -> Any:
    """How a value prints: nothing for null, true/false, JSON for lists and maps."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return value


def _environment(undefined: type[jinja2.Undefined]) -> _Bounded:
    env = _Bounded(undefined=undefined, autoescape=False, keep_trailing_newline=True, auto_reload=False, cache_size=0,
                   finalize=_finalize)
    env.filters.update(
        currency=_currency, number=_number, date=_date, days_until=_days_until, days_since=_days_since,
        url_encode=lambda v: quote(str(v), safe=""),
    )
    env.globals.update(now=lambda: datetime.now(UTC), coalesce=_coalesce, __pigeon_iterate=_iterate)
    # range() in the sandbox is already capped (MAX_RANGE); loops over it count as iterations too.
    return env


_ENVIRONMENTS: dict[str, _Bounded] = {"default": _environment(_Missing), "exclude": _environment(_MissingExcludes)}


#: What can go wrong in a render or a test (translated by `_error`).
_RENDER_ERRORS = (
    TemplateLimit, jinja2.UndefinedError, jinja2.sandbox.SecurityError, RecursionError, TypeError, ValueError,
    ArithmeticError, LookupError, AttributeError, jinja2.TemplateError,
)


def _error(name: str, what: str, exc: BaseException) -> TemplateError:
    """What went wrong in a render of a template or a test of a condition, as our error,
    naming the field."""
    if isinstance(exc, TemplateLimit):
        return TemplateLimit(f"{name}: {exc.message}", field=name)
    if isinstance(exc, jinja2.UndefinedError):
        return MissingValue(f"{name}: {exc.message}", field=name)
    if isinstance(exc, jinja2.sandbox.SecurityError):
        return TemplateError(f"{name}: not allowed in a {what}: {exc}", field=name)
    if isinstance(exc, RecursionError):
        return TemplateLimit(f"{name}: the {what} recurses too deep", field=name)
    return TemplateError(f"{name}: {type(exc).__name__}: {exc}", field=name)


class Scope:
    """The names one profile's templates see, bound once for all of them.

    Jinja makes a context per render (a copy of the globals and the names); a scope makes one
    per environment and hands it to each template in turn, after clearing what the previous
    one set (``{% set %}`` at the top level), so that templates stay independent.
    """

    __slots__ = ("names", "_contexts")

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names
        self._contexts: dict[int, Context] = {}

    def context(self, template: jinja2.Template) -> Context:
        if template.blocks:  # a block needs the context of its own template
            return template.new_context(self.names)
        key = id(template.environment)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = template.new_context(self.names)
        else:
            context.vars.clear()
            context.exported_vars.clear()
        return context


class Field:
    """A compiled field: `render` it with a context. Plain text renders as itself."""

    __slots__ = ("name", "source", "_template")

    def __init__(self, name: str, source: str, template: jinja2.Template | None) -> None:
        self.name = name
        self.source = source
        self._template = template

    @property
    def is_template(self) -> bool:
        return self._template is not None

    def render(self, context: dict[str, Any] | Scope) -> str:
        """Render for one profile (its names, or better, its `Scope`).

        Raises:
            MissingValue: a value is missing and the field's message excludes such profiles.
            TemplateLimit: a bound was broken.
            TemplateError: the template failed otherwise (a type error, a division by zero).
        """
        template = self._template
        if template is None:
            return self.source
        _budget.iterations = MAX_ITERATIONS
        scope = context if type(context) is Scope else Scope(context)  # type: ignore[arg-type]
        try:
            parts = []
            size = 0
            for chunk in template.root_render_func(scope.context(template)):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateLimit(f"the template renders more than {MAX_OUTPUT} characters")
                parts.append(chunk)
            return "".join(parts)
        except _RENDER_ERRORS as exc:
            raise _error(self.name, "template", exc) from None


def compile_field(name: str, source: str, on_missing: OnMissing = "default") -> Field:
    """Compile ``source`` (the field ``name``, for messages: ``$.content.title``).

    Raises:
        TemplateSyntax: naming the field, line and column.
    """
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return Field(name, source, None)
    env = _ENVIRONMENTS[on_missing]
    try:
        tree = env.parse(source)
        _bound_loops(tree)
        template = env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        column = _column(env, source, exc.lineno)
        where = f"line {exc.lineno}" + (f", column {column}" if column else "")
        raise TemplateSyntax(f"{name}: {where}: {exc.message}", field=name) from None
    return Field(name, source, template)


class Condition:
    """A compiled condition (an audience): `test` it with a context."""

    __slots__ = ("name", "source", "_template")

    def __init__(self, name: str, source: str, template: jinja2.Template) -> None:
        self.name = name
        self.source = source
        self._template = template

    def test(self, context: dict[str, Any] | Scope) -> bool:
        """Whether the context qualifies; a missing value does not (it is false).

        Raises:
            TemplateLimit, TemplateError: as `Field.render`.
        """
        _budget.iterations = MAX_ITERATIONS
        scope = context if type(context) is Scope else Scope(context)  # type: ignore[arg-type]
        try:
            jinja_context = scope.context(self._template)
            for _ in self._template.root_render_func(jinja_context):
                pass
            result = jinja_context.vars["result"]
            return False if isinstance(result, jinja2.Undefined) else bool(result)
        except jinja2.UndefinedError:
            return False  # compared or computed with a missing value
        except _RENDER_ERRORS as exc:
            raise _error(self.name, "condition", exc) from None


def compile_condition(name: str, source: str) -> Condition:
    """Compile an expression such as ``profile.loyalty.points > 1000 and 'vip' in profile.audiences``.

    Raises:
        TemplateSyntax: naming the field and where.
    """
    env = _ENVIRONMENTS["default"]
    try:
        # What Environment.compile_expression does, keeping the template: a Scope renders it.
        parser = Parser(env, source, state="variable")
        expression = parser.parse_expression()
        if not parser.stream.eos:
            raise jinja2.TemplateSyntaxError("chunk after expression", parser.stream.current.lineno, None, None)
        expression.set_environment(env)
        body = [jinja2.nodes.Assign(jinja2.nodes.Name("result", "store"), expression, lineno=1)]
        template = env.from_string(jinja2.nodes.Template(body, lineno=1))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateSyntax(f"{name}: {exc.message}", field=name) from None
    return Condition(name, source, template)


def _column(env: jinja2.Environment, source: str, lineno: int) -> int | None:
    """Jinja reports the line only: the column of the first ``{{ ... }}`` on that line that does
    not compile alone, else of the line's first tag."""
    lines = source.splitlines()
    if not 1 <= lineno <= len(lines):
        return None
    line = lines[lineno - 1]
    at = line.find("{{")
    while at >= 0:
        end = line.find("}}", at)
        try:
            env.parse(line[at:] if end < 0 else line[at : end + 2])
        except jinja2.TemplateSyntaxError:
            return at + 1
        at = line.find("{{", at + 2)
    starts = [i for i in (line.find("{{"), line.find("{%"), line.find("{#")) if i >= 0]
    return min(starts) + 1 if starts else 1
