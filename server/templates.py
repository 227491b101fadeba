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
once per profile instead of once per template (it is most of a small template's cost).

Bounds. Whatever a template holds, and whatever data it is given, compiling and rendering it
take bounded time and memory, so that a template cannot hold the server (it renders in the
server's event loop). Python cannot interrupt a long operation of its own (a power of big
numbers, ``str.center``), so sizes are bounded before they are computed:

- compiling evaluates nothing (Jinja would fold constant expressions, filters included, while
  it compiles): its cost follows the source, at most `MAX_SOURCE` characters; nesting too deep
  for Jinja's parser or Python's compiler is a `TemplateLimit`;
- every value a template makes, a text or a list, by an operator (``+ - * / // % **``,
  ``~``, a slice), a filter or a method, is at most `MAX_VALUE` characters or items, and a
  number at most `MAX_INT_BITS` bits: where a result can outgrow its operands (``*``, ``**``,
  ``%`` and ``format`` widths, ``center``, ``indent``, ``replace``, ``join``...) its size is
  worked out from the operands first; a filter goes through at most `MAX_VALUE` characters or
  items of its input;
- a profile's templates (its audience condition and every field of its message share one
  `Scope`) may iterate `MAX_ITERATIONS` times in all loops, make `MAX_MADE` characters or items
  in all, and take `MAX_SECONDS` of CPU time, read between operations (each bounded as above);
- a field renders at most `MAX_OUTPUT` characters, and so does each macro or block within it;
  macros recurse at most as deep as Python's recursion limit.

A template breaking a bound raises `TemplateLimit` naming the field and the bound.

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

Why one module of about 1,000 lines: the bounds above hold only together. The budget, the
guards around every filter, test and method, the size each one works out before it runs, and
the rewrite of what Jinja compiles to plain Python (loops, ``~``, slices) each close a hole the
others leave open; read apart, each part would look safe alone. It is also the public module
plugin authors and the pipeline import (`compile_field`, `compile_condition`, `Scope`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import types
from collections.abc import Callable, Iterable, MappingView
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from functools import update_wrapper
from typing import Any, Literal, cast
from urllib.parse import quote

import jinja2
import jinja2.nodes
import jinja2.sandbox
from jinja2.filters import make_attrgetter
from jinja2.lexer import describe_token
from jinja2.parser import Parser
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import EscapeFormatter, Markup

from server.runtime.errors import InvalidArgument

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
    "MAX_SOURCE",
    "MAX_ITERATIONS",
    "MAX_OUTPUT",
    "MAX_VALUE",
    "MAX_INT_BITS",
    "MAX_MADE",
    "MAX_SECONDS",
]

#: Characters in a template's source (what compiling it costs: about 5 ms a KB).
MAX_SOURCE = 4_096
#: Loop iterations a profile's templates may take, all loops together.
MAX_ITERATIONS = 10_000
#: Characters a field may render (and each macro or block within it).
MAX_OUTPUT = 16_384
#: Characters or items in any value a template makes (a text, a list).
MAX_VALUE = 16_384
#: Bits in any number a template makes (``10 ** 999`` has 3,319).
MAX_INT_BITS = 16_384
#: Characters or items a profile's templates may make in all: the memory they may take.
MAX_MADE = 1_000_000
#: CPU seconds a profile's templates may take.
MAX_SECONDS = 0.05
#: Operations between two readings of the CPU clock (a reading costs about 0.25 µs).
_CHECK_EVERY = 16

OnMissing = Literal["default", "exclude"]


class TemplateError(InvalidArgument):
    """A template cannot be used or rendered; names the field."""


class TemplateSyntax(TemplateError):
    """A template does not compile (the message names line and column)."""


class TemplateLimit(TemplateError):
    """A template broke a bound (size, iterations, work, CPU time, nesting)."""


class MissingValue(TemplateError):
    """A value the template uses is missing and the message excludes such profiles."""


# -- the budget of a profile's renders -------------------------------------------------------


class _Budget:
    """What a profile's templates may still spend (its `Scope` holds one). The render in
    progress charges the one in `_budget`: renders do not interleave, each runs to its end in
    one thread."""

    __slots__ = ("iterations", "made", "seconds", "ticks", "clock")

    def __init__(self) -> None:
        self.iterations = MAX_ITERATIONS
        self.made = MAX_MADE
        self.seconds = MAX_SECONDS
        self.ticks = _CHECK_EVERY
        #: The thread's CPU time at the last reading in the render in progress (None: none yet).
        self.clock: float | None = None


_budget = _Budget()


def _tick() -> None:
    """One operation (a loop iteration, a call, a filter, an operator). (The hottest hooks do
    this inline.)"""
    budget = _budget
    budget.ticks -= 1
    if budget.ticks <= 0:
        _read_clock(budget)


def _read_clock(budget: _Budget) -> None:
    """Every `_CHECK_EVERY`-th operation: charge the thread's CPU time since the last reading
    in this render."""
    budget.ticks = _CHECK_EVERY
    now = time.thread_time()
    if budget.clock is not None:
        budget.seconds -= now - budget.clock
        if budget.seconds < 0:
            raise TemplateLimit(f"the templates take more than {MAX_SECONDS * 1000:g} ms of CPU time")
    budget.clock = now


def _fits(size: int, what: str) -> None:
    """Refuse to make a value of ``size`` characters or items over `MAX_VALUE`."""
    if size > MAX_VALUE:
        raise TemplateLimit(f"{what} would make {size} characters or items; at most {MAX_VALUE}")


_SIZED = (str, bytes, list, tuple, dict, set, frozenset)
#: What a filter goes through (a range is lazy, but a filter would go through it all).
_INPUTS = (*_SIZED, range)


def _made(value: Any, what: str, inputs: tuple[Any, ...] = (), named: dict[str, Any] | None = None) -> Any:
    """``value``, just made by ``what``: a text or list is counted in the budget (unless it is
    a large one of the ``inputs`` or ``named`` given back); over `MAX_VALUE` (a number over
    `MAX_INT_BITS` bits) it is refused. Where it could have been much larger, its size was
    bounded before."""
    if isinstance(value, _SIZED):
        size = len(value)
        if size > 256:
            if any(value is given for given in inputs) or (named and any(value is given for given in named.values())):
                return value
            _fits(size, what)
        _charge(size)
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimit(f"{what} would make a number of {value.bit_length()} bits; at most {MAX_INT_BITS}")
    return value


def _charge(size: int) -> None:
    """Count ``size`` characters or items made in the budget (`MAX_MADE`)."""
    budget = _budget
    budget.made -= size
    if budget.made < 0:
        raise TemplateLimit(f"the templates make more than {MAX_MADE} characters or items in all")


def _printed(value: Any, limit: int = MAX_VALUE) -> int:
    """About how many characters ``str(value)`` (or its JSON) has, found without making it, and
    only up to just past ``limit``: lists and maps are walked, not printed (a list holding the
    same long text 10,000 times is small to hold and huge to print)."""
    size = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, (str, bytes)):
            size += len(item) + 2
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 2
        elif isinstance(item, dict):
            size += 2 + 4 * len(item)
            if size <= limit:
                pending.extend(item.keys())
                pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, MappingView)):
            size += 2 + 2 * len(item)
            if size <= limit:
                pending.extend(cast(Iterable[Any], item))  # a MappingView iterates too
        elif isinstance(item, Namespace):
            pending.append(item._Namespace__attrs)  # its repr is its attributes'
            size += 12
        else:
            size += 64  # a float, a date, none, an undefined value, a Jinja object: a short text
        if size > limit:
            break
    return size


def _text(value: Any, what: str = "printing a value") -> str:
    """``str(value)``, bounded before it is made."""
    if isinstance(value, str):
        return value
    _tick()
    _fits(_printed(value), what)
    return _made(str(value), what)


def _width(value: Any) -> int:
    """A width, count, length or precision argument as a size (0 if it is not a number: the
    operation then fails by itself)."""
    return abs(value) if isinstance(value, int) else 0


def _length(value: Any) -> int:
    """The length of a text argument (a filter makes one of anything else)."""
    return len(value) if isinstance(value, (str, bytes)) else _printed(value)


# -- formatting: ``%`` and str.format ----------------------------------------------------------

_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def _percent_size(format: str | bytes, args: Any) -> int:
    """About how long ``format % args`` is, from the format's widths and precisions (given or
    ``*``) and the sizes of the values, without making it."""
    if isinstance(format, bytes):
        format = format.decode("latin-1")
    positional = list(args) if type(args) is tuple else [args]
    size = len(format)
    for key, width, precision, kind in _PERCENT.findall(format):
        if kind == "%":
            continue
        for number in (width, precision):
            if number == "*":
                size += _width(positional.pop(0)) if positional else 0
            elif number:
                size += int(number) if len(number) <= 10 else 10**10
        if key:
            value = args[key] if isinstance(args, dict) else None
        else:
            value = positional.pop(0) if positional else None
        if kind in "sra":
            size += _printed(value, MAX_VALUE - size) if size <= MAX_VALUE else 0
        else:
            size += 1 if kind == "c" else 330  # a number: at most 309 digits, a sign, a point, an exponent
    return size


class _Formatter(jinja2.sandbox.SandboxedFormatter):
    """``str.format`` in the sandbox, bounded: a field's text is measured before it is made
    (its value's size and the numbers in its spec: width, precision), and so is the whole."""

    def __init__(self, env: jinja2.Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.size = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:  # !r, !s, !a: a text of the value
            _fits(self.size + _printed(value), "'format'")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> str:
        numbers = [int(n) if len(n) <= 10 else 10**10 for n in re.findall(r"\d+", format_spec)]
        _fits(self.size + max(numbers, default=0) + _printed(value), "'format'")
        text: str = super().format_field(value, format_spec)
        self.size += len(text)
        _fits(self.size, "'format'")
        return text


class _EscapeFormatter(_Formatter, EscapeFormatter):
    """`_Formatter` for a `Markup` text (its values are escaped)."""


# -- the environment ------------------------------------------------------------------------

_BINOPS = frozenset({"+", "-", "*", "/", "//", "%", "**"})
_SEQUENCES = (str, bytes, list, tuple)
#: Methods that run a codec: some are Python code, some quadratic (punycode).
_CODECS = frozenset({"encode", "decode"})


def _text_method_size(name: str, owner: str | bytes, args: tuple[Any, ...]) -> int | None:
    """How long a text method's result may be, for those whose result can outgrow the text."""
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(owner), _width(args[0])) if args else None
    if name == "expandtabs":
        tab = "\t" if isinstance(owner, str) else b"\t"
        return len(owner) + owner.count(tab) * _width(args[0] if args else 8)  # type: ignore[arg-type]
    if name == "replace" and len(args) >= 2 and all(isinstance(a, type(owner)) for a in args[:2]):
        old, new = args[0], args[1]
        count = owner.count(old) if old else len(owner) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        return len(owner) + count * max(len(new) - len(old), 0)
    if name == "translate" and args:
        table = args[0]
        values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        return len(owner) * max(longest, 1)
    return None


def _method_size(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """How large a builtin method's result may be, where it can outgrow what it is given:
    ``str.center(10 ** 9)``, ``int.to_bytes(10 ** 9)``..."""
    owner, name = method.__self__, method.__name__
    if isinstance(owner, (str, bytes)):
        return _text_method_size(name, owner, args)
    if isinstance(owner, int) and name == "to_bytes":
        return _width(args[0] if args else kwargs.get("length", 1))
    if isinstance(owner, (date, time_of_day)) and name == "strftime" and args and isinstance(args[0], str):
        return 16 * len(args[0])  # %c is 24 characters for 2
    return None


def _joined_size(items: list[Any], separator: int) -> int:
    """How long the items joined are (texts measured, others as printed), up to just past
    `MAX_VALUE`."""
    size = separator * max(len(items) - 1, 0)
    for item in items:
        if size > MAX_VALUE:
            break
        size += len(item) if isinstance(item, (str, bytes)) else _printed(item, MAX_VALUE - size)
    return size


def _iterate(iterable: Any) -> Any:
    """A loop's iterable, each item counted (`MAX_ITERATIONS`, and an operation)."""
    for item in iterable:
        budget = _budget
        budget.iterations -= 1
        if budget.iterations < 0:
            raise TemplateLimit(f"the template loops more than {MAX_ITERATIONS} times")
        budget.ticks -= 1
        if budget.ticks <= 0:
            _read_clock(budget)
        yield item


def _concat(*values: Any) -> str:
    """``a ~ b ~ ...`` (Jinja joins the texts directly), measured before they are joined."""
    texts = []
    size = 0
    for value in values:
        if type(value) is not str:
            _fits(size + _printed(value, MAX_VALUE - size), "'~'")
            value = str(value)
        size += len(value)
        _fits(size, "'~'")
        texts.append(value)
    return _made("".join(texts), "'~'")


def _slice(value: Any, start: Any, stop: Any, step: Any) -> Any:
    """``value[start:stop:step]`` (Jinja slices directly), the copy counted."""
    return _made(value[start:stop:step], "a slice", (value,))


def _join_output(parts: Any) -> str:
    """What a macro, a call or filter block, or a ``{% set %}`` block printed, joined (Jinja's
    `Environment.concat`): bounded as a field's own output is."""
    if type(parts) is not list:
        parts = list(parts)
    size = sum(map(len, parts))
    if size > MAX_OUTPUT:
        raise TemplateLimit(f"a macro or block renders more than {MAX_OUTPUT} characters")
    return _made("".join(parts), "a macro or block")


class _Bounded(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can make a large value bounded (see the module's
    docstring); the hooks are Jinja's own (operators, calls, attributes) plus those added to
    the tree by `_Bounds` (loops, ``~``, slices) and the guarded filters and tests."""

    intercepted_binops = _BINOPS
    concat = staticmethod(_join_output)
    # What `_Bounds` routes through the budget (environment attributes: no name a template sees).
    pigeon_iterate = staticmethod(_iterate)
    pigeon_concat = staticmethod(_concat)
    pigeon_slice = staticmethod(_slice)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Profile data first: ``event.items`` is the event's items, not dict.items.
        if isinstance(obj, dict):
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        _tick()
        if operator_ == "**":
            if type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
                bits = (abs(left).bit_length() - 1) * right
                if bits > MAX_INT_BITS:
                    raise TemplateLimit(f"'**' would make a number of about {bits} bits (exponent {right}); "
                                        f"at most {MAX_INT_BITS}")
        elif operator_ == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise TemplateLimit(f"'*' would make a number of about {left.bit_length() + right.bit_length()} "
                                        f"bits; at most {MAX_INT_BITS}")
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and isinstance(count, int):
                    _fits(len(seq) * count, "'*'")
        elif operator_ == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                _fits(len(left) + len(right), "'+'")
        elif operator_ == "%" and isinstance(left, (str, bytes)):
            _fits(_percent_size(left, right), "'%'")
        return _made(self.binop_table[operator_](left, right), f"'{operator_}'", (left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        if isinstance(__obj, (Macro, LoopContext)) or __obj is _iterate or __obj is _concat or __obj is _slice:
            if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level iterates too
                args = (_iterate(args[0]), *args[1:])
            return super().call(__context, __obj, *args, **kwargs)  # they count what they make
        inputs = args
        if isinstance(__obj, (types.BuiltinMethodType, types.MethodType)):
            owner = __obj.__self__
            if __obj.__name__ in _CODECS:
                raise jinja2.sandbox.SecurityError(f"{__obj.__name__}() is not allowed (a codec may take any time)")
            if __obj.__name__ == "join" and isinstance(owner, (str, bytes)) and args:
                args = (list(args[0]), *args[1:])  # measured before it is joined
                _fits(_joined_size(args[0], len(owner)), "join()")
            else:
                size = _method_size(__obj, args, kwargs)
                if size is not None:
                    _fits(size, f"{__obj.__name__}()")
            inputs = (owner, *args)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, _SIZED) or type(result) is int:
            return _made(result, f"{getattr(__obj, '__name__', 'a call')}()", inputs, kwargs)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` and ``format_map``, run by `_Formatter` (Jinja's own formatter keeps
        attributes safe, not sizes)."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format", "format_map"
        ) or not isinstance(value.__self__, str):
            return None
        text: str = value.__self__
        format_map = value.__name__ == "format_map"
        env = self

        def format(*args: Any, **kwargs: Any) -> str:
            if format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs = args[0]
                args = ()
            formatter = _EscapeFormatter(env, escape=text.escape) if isinstance(text, Markup) else _Formatter(env)
            return type(text)(formatter.vformat(text, args, kwargs))

        return update_wrapper(format, value)


def _call(name: str, node: jinja2.nodes.Node, *args: jinja2.nodes.Node) -> jinja2.nodes.Call:
    """A call of the environment's function ``name``, where ``node`` was."""
    function = jinja2.nodes.EnvironmentAttribute(name, lineno=node.lineno)
    return jinja2.nodes.Call(function, list(args), [], None, None, lineno=node.lineno)  # type: ignore[arg-type]  # Jinja's own nodes are Exprs


class _Bounds(NodeTransformer):
    """Route through the budget what Jinja compiles to plain Python, out of the sandbox's
    sight: each loop's iterable (`_iterate`), each ``~`` (`_concat`), each slice (`_slice`)."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        self.generic_visit(node)
        node.iter = _call("pigeon_iterate", node, node.iter)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        self.generic_visit(node)
        return _call("pigeon_concat", node, *node.nodes)

    def visit_Getitem(self, node: jinja2.nodes.Getitem) -> jinja2.nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.arg, jinja2.nodes.Slice):
            return node
        none = jinja2.nodes.Const(None, lineno=node.lineno)
        bounds = [part or none for part in (node.arg.start, node.arg.stop, node.arg.step)]
        return _call("pigeon_slice", node, node.node, *bounds)


class _Missing(jinja2.ChainableUndefined):
    """A missing value: renders as nothing, chains (``a.b.c``), works with ``default``."""


class _MissingExcludes(jinja2.ChainableUndefined):
    """A missing value with ``on_missing="exclude"``: printing, testing or iterating it raises
    (`MissingValue`); ``default(...)`` still applies, even below a missing parent."""

    __str__ = __iter__ = __len__ = __bool__ = __eq__ = __ne__ = __contains__ = (  # type: ignore[assignment]
        jinja2.Undefined._fail_with_undefined_error
    )
    __hash__ = None  # type: ignore[assignment]


# -- helpers -------------------------------------------------------------------------------


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
    if when is None:
        return ""
    _fits(16 * len(format), "'date'")  # %c is 24 characters for 2
    return when.strftime(format)


def _days_until(value: Any) -> int | str:
    when = _to_datetime(value)
    return "" if when is None else math.ceil((when - datetime.now(UTC)).total_seconds() / 86400)


def _days_since(value: Any) -> int | str:
    when = _to_datetime(value)
    return "" if when is None else math.floor((datetime.now(UTC) - when).total_seconds() / 86400)


def _number(value: Any, places: int = 0) -> str:
    try:
        places = int(places)
        _fits(abs(places) + 420, "'number'")  # 1e308: 309 digits and 102 commas
        return f"{float(value):,.{places}f}"
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


@jinja2.pass_environment
def _join(environment: jinja2.Environment, value: Any, d: Any = "", attribute: Any = None) -> str:
    """Jinja's ``join``, measuring the texts as it goes (Jinja's joins them in one go)."""
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    separator = _text(d, "'join'")
    texts = []
    size = -len(separator)
    for item in value:
        if type(item) is not str:
            _fits(size + len(separator) + _printed(item, MAX_VALUE - size), "'join'")
            item = str(item)
        size += len(separator) + len(item)
        _fits(size, "'join'")
        texts.append(item)
    return separator.join(texts)


@jinja2.pass_environment
def _sum(environment: jinja2.Environment, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """Jinja's ``sum``; lists or tuples (``sum(start=[])``, to flatten) are added in one go,
    where Python's ``sum`` copies the growing result at each step."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    if not isinstance(start, (list, tuple)):
        return sum(iterable, start)
    parts = [start, *iterable]
    for part in parts:
        if type(part) is not type(start):
            raise TypeError(f'can only concatenate {type(start).__name__} (not "{type(part).__name__}") '
                            f"to {type(start).__name__}")
    _fits(sum(map(len, parts)), "'sum'")
    return type(start)(itertools.chain.from_iterable(parts))


def _namespace(*args: Any, **kwargs: Any) -> Namespace:
    """Jinja's ``namespace()``, its attributes (a copy of what it is given) counted."""
    space = Namespace(*args, **kwargs)
    _made(space._Namespace__attrs, "namespace()")
    return space


@jinja2.pass_context
def _finalize(context: Context, value: Any) -> Any:
    """How a value prints: nothing for null, true/false, JSON for lists and maps. (Taking the
    context keeps Jinja from folding constant output while it compiles, which would run
    filters then: ``{{ 'a' | center(10 ** 9) }}``.)"""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        _tick()
        _fits(_printed(value), "printing a list or map")
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        return _made(text, "printing a list or map")
    if isinstance(value, (str, int, float, jinja2.Undefined)):
        return value
    return _text(value)


# -- filters, tests and globals, guarded ---------------------------------------------------

#: Filters that do not go through their input (the others take at most MAX_VALUE of it).
_INSTANT = frozenset({"abs", "attr", "count", "currency", "d", "date", "days_since", "days_until", "default", "first",
                      "float", "int", "last", "length", "number", "random", "round", "truncate"})
#: Filters that make a key of each item (a lower-case copy of each text): the input's texts
#: are counted as made.
_KEYED = frozenset({"dictsort", "groupby", "max", "min", "sort", "unique"})
#: Filters that make a text of their arguments (measured first: a list of 10,000 times the same long text).
_TEXTUAL = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "pprint",
                      "replace", "safe", "string", "striptags", "title", "tojson", "trim", "truncate", "upper",
                      "url_encode", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"})


def _center_size(value: Any, width: Any = 80) -> int:
    return max(_length(value), _width(width))


def _indent_size(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> int:
    lines = (s.count("\n") if isinstance(s, str) else _printed(s)) + 1
    return _length(s) + lines * (len(width) if isinstance(width, str) else _width(width))


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                   break_on_hyphens: Any = True) -> int:
    return (_length(s) + 1) * (1 + (len(wrapstring) if isinstance(wrapstring, str) else 1))


def _format_size(value: Any, *args: Any, **kwargs: Any) -> int:
    return _percent_size(value if isinstance(value, str) else str(value), kwargs or args)


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    return _text_method_size("replace", str(s), (str(old), str(new), -1 if count is None else count)) or 0


def _batch_size(value: Any, linecount: Any, fill_with: Any = None) -> int:
    return 0 if fill_with is None else _width(linecount)


def _slice_size(value: Any, slices: Any, fill_with: Any = None) -> int:
    return _width(slices)  # one list each


def _urlize_size(value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None, rel: Any = None,
                 extra_schemes: Any = None) -> int:
    text = str(value)
    attributes = 64 + sum(len(a) for a in (target, rel) if isinstance(a, str))
    return 2 * len(text) + (len(text.split()) + 1) * attributes


def _tojson_size(value: Any, indent: Any = None) -> int:
    return _printed(value) * (1 + _width(indent))


def _round_size(value: Any, precision: Any = 0, method: Any = "common") -> int:
    return _width(precision)  # a power of ten of as many digits


def _lipsum_size(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> int:
    return _width(n) * _width(max) * 12


#: How large a filter's result may be, from its arguments, for Jinja's filters whose result
#: can outgrow their input (the others are checked once made; ours bound themselves).
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": _center_size, "indent": _indent_size, "wordwrap": _wordwrap_size, "format": _format_size,
    "replace": _replace_size, "batch": _batch_size, "slice": _slice_size, "urlize": _urlize_size,
    "tojson": _tojson_size, "round": _round_size,
}


def _guarded(name: str, function: Callable[..., Any], size: Callable[..., int] | None = None, *,
             textual: bool = False, goes_through: bool = False, keyed: bool = False) -> Callable[..., Any]:
    """``function`` (a filter, a test, a global), bounded: its input (when it goes through it),
    its arguments made into texts (when ``textual``), the keys it makes (when ``keyed``), its
    result's size from its arguments (``size``) before it runs, and its result once made."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0  # a context or environment first
    what = f"'{name}'"

    def check(given: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if goes_through and given and isinstance(given[0], _INPUTS) and len(given[0]) > MAX_VALUE:
            raise TemplateLimit(f"{what} would go through {len(given[0])} characters or items; at most {MAX_VALUE}")
        if textual:
            for arg in (*given, *kwargs.values()):
                if not isinstance(arg, (str, int, float, jinja2.Undefined)) and arg is not None:
                    _fits(_printed(arg), what)
        if keyed and given:
            _charge(_printed(given[0], _budget.made))
        if size is not None:
            _fits(size(*given, **kwargs), what)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget
        budget.ticks -= 1
        if budget.ticks <= 0:
            _read_clock(budget)
        if goes_through or textual or keyed or size is not None:
            check(args[skip:], kwargs)
        return _made(function(*args, **kwargs), what, args, kwargs)

    return update_wrapper(guarded, function)


def _environment(undefined: type[jinja2.Undefined]) -> _Bounded:
    # optimized=False: no constant folding while compiling (nor does _finalize allow it for output).
    env = _Bounded(undefined=undefined, autoescape=False, keep_trailing_newline=True, auto_reload=False, cache_size=0,
                   finalize=_finalize, optimized=False)
    env.filters.update(
        join=_join, sum=_sum, currency=_currency, number=_number, date=_date, days_until=_days_until,
        days_since=_days_since, url_encode=lambda v: quote(str(v), safe=""),
    )
    for name, function in env.filters.items():
        env.filters[name] = _guarded(name, cast(Callable[..., Any], function), _FILTER_SIZES.get(name), textual=name in _TEXTUAL,
                                     goes_through=name not in _INSTANT, keyed=name in _KEYED)
    for name, function in env.tests.items():
        env.tests[name] = _guarded(name, cast(Callable[..., Any], function), textual=name in ("lower", "upper"))
    # range() in the sandbox is already capped (MAX_RANGE, lazy); loops over it count as iterations.
    env.globals.update(
        lipsum=_guarded("lipsum", cast(Callable[..., Any], env.globals["lipsum"]), _lipsum_size), namespace=_namespace,
        now=lambda: datetime.now(UTC), coalesce=_coalesce,
    )
    return env


_ENVIRONMENTS: dict[str, _Bounded] = {"default": _environment(_Missing), "exclude": _environment(_MissingExcludes)}


#: What can go wrong in a render or a test (translated by `_error`).
_RENDER_ERRORS = (
    TemplateLimit, jinja2.UndefinedError, jinja2.sandbox.SecurityError, RecursionError, TypeError, ValueError,
    ArithmeticError, LookupError, AttributeError, jinja2.TemplateError,
    AssertionError, RuntimeError,  # Jinja's checks of a filter's arguments (truncate), a generator's end
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


#: An environment's globals as one dict, by environment (`Scope.context`).
_FLAT_GLOBALS: dict[int, dict[str, Any]] = {}


def _flat_globals(template: jinja2.Template) -> dict[str, Any]:
    """``dict(template.globals)``: the environment's (a template compiled here has none of its
    own), flattened once per environment."""
    maps = getattr(template.globals, "maps", None)
    if maps is None or len(maps) != 2 or maps[0] or maps[1] is not template.environment.globals:
        return dict(template.globals)
    found = _FLAT_GLOBALS.get(id(template.environment))
    if found is None:
        found = _FLAT_GLOBALS[id(template.environment)] = dict(template.globals)
    return found


class Scope:
    """The names one profile's templates see, bound once for all of them, and their budget
    (`MAX_ITERATIONS`, `MAX_MADE`, `MAX_SECONDS` are a profile's, shared by its templates).

    Jinja makes a context per render (a copy of the globals and the names); a scope makes one
    per environment and hands it to each template in turn, after clearing what the previous
    one set (``{% set %}`` at the top level), so that templates stay independent.
    """

    __slots__ = ("names", "_contexts", "budget")

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names
        self._contexts: dict[int, Context] = {}
        self.budget = _Budget()

    def context(self, template: jinja2.Template) -> Context:
        if template.blocks:  # a block needs the context of its own template
            return template.new_context(self.names)
        key = id(template.environment)
        context = self._contexts.get(key)
        if context is None:
            # What ``template.new_context(self.names)`` makes, without reading the globals
            # through their ChainMap (twice) at each profile: a third of a push's render, a
            # quarter of a read audience's entry.
            flat = _flat_globals(template)
            context = self._contexts[key] = template.environment.context_class(
                template.environment, {**flat, **self.names}, template.name, template.blocks, globals=flat)
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
        scope = context if type(context) is Scope else Scope(context)  # type: ignore[arg-type]
        global _budget
        _budget = scope.budget
        _budget.clock = None  # the time between renders is not theirs
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


def _compile(name: str, compile: Callable[[], jinja2.Template]) -> jinja2.Template:
    """``compile()``, with nesting too deep for Jinja's parser or Python's compiler (a
    RecursionError, or Python's SyntaxError "too many nested parentheses" or "too many
    statically nested blocks") as a `TemplateLimit`, and what else Python refuses in the code
    Jinja made ("keyword argument repeated") as a `TemplateSyntax`, naming the field."""
    try:
        return compile()
    except (RecursionError, MemoryError):
        raise TemplateLimit(f"{name}: the template is nested too deep", field=name) from None
    except SyntaxError as exc:
        if exc.msg.startswith("too many"):
            raise TemplateLimit(f"{name}: the template is nested too deep", field=name) from None
        raise TemplateSyntax(f"{name}: {exc.msg}", field=name) from None


def _too_long(name: str, source: str) -> None:
    if len(source) > MAX_SOURCE:
        raise TemplateLimit(f"{name}: the template has {len(source)} characters; at most {MAX_SOURCE}", field=name)


def compile_field(name: str, source: str, on_missing: OnMissing = "default") -> Field:
    """Compile ``source`` (the field ``name``, for messages: ``$.content.title``).

    Raises:
        TemplateSyntax: naming the field, line and column.
        TemplateLimit: the source is longer than `MAX_SOURCE`, or nested too deep.
    """
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return Field(name, source, None)
    _too_long(name, source)
    env = _ENVIRONMENTS[on_missing]
    try:
        template = _compile(name, lambda: env.from_string(_Bounds().visit(env.parse(source))))
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
        return bool(self.value(context))

    def value(self, context: dict[str, Any] | Scope) -> Any:
        """The expression's value in the context (None when it uses a missing value).

        Raises:
            TemplateLimit, TemplateError: as `Field.render`.
        """
        scope = context if type(context) is Scope else Scope(context)  # type: ignore[arg-type]
        global _budget
        _budget = scope.budget
        _budget.clock = None  # the time between renders is not theirs
        try:
            jinja_context = scope.context(self._template)
            for _ in self._template.root_render_func(jinja_context):
                pass
            result = jinja_context.vars["result"]
            return None if isinstance(result, jinja2.Undefined) else result
        except jinja2.UndefinedError:
            return None  # compared or computed with a missing value
        except _RENDER_ERRORS as exc:
            raise _error(self.name, "condition", exc) from None


#: What to say of a token left after a condition's expression.
_AFTER_EXPRESSION = {
    "assign": ": to compare, write '==' (profile.city == 'Oslo')",
    "name": ": to combine conditions, join them with 'and' or 'or'",
}


def compile_condition(name: str, source: str) -> Condition:
    """Compile an expression such as ``profile.loyalty.points > 1000 and 'vip' in profile.audiences``.

    Raises:
        TemplateSyntax: naming the field and where.
        TemplateLimit: the source is longer than `MAX_SOURCE`, or nested too deep.
    """
    _too_long(name, source)
    env = _ENVIRONMENTS["default"]

    def compile() -> jinja2.Template:
        # What Environment.compile_expression does, keeping the template: a Scope renders it.
        parser = Parser(env, source, state="variable")
        expression = parser.parse_expression()
        if not parser.stream.eos:
            token = parser.stream.current
            raise jinja2.TemplateSyntaxError(
                f"unexpected '{describe_token(token)}' after the expression{_AFTER_EXPRESSION.get(token.type, '')}",
                token.lineno, None, None,
            )
        body = [jinja2.nodes.Assign(jinja2.nodes.Name("result", "store"), expression, lineno=1)]
        tree = _Bounds().visit(jinja2.nodes.Template(body, lineno=1))
        tree.set_environment(env)
        return env.from_string(tree)

    try:
        template = _compile(name, compile)
    except jinja2.TemplateSyntaxError as exc:
        where = f"line {exc.lineno}: " if "\n" in source.strip() else ""
        raise TemplateSyntax(f"{name}: {where}{exc.message}", field=name) from None
    return Condition(name, source, template)


def _column(env: jinja2.Environment, source: str, lineno: int) -> int | None:
    """Jinja reports the line only: the column of the first ``{{ ... }}`` on that line that does
    not compile alone (or is not closed), else of the line's first tag."""
    lines = source.splitlines()
    if not 1 <= lineno <= len(lines):
        return None
    line = lines[lineno - 1]
    at = line.find("{{")
    while at >= 0:
        end = line.find("}}", at)
        if end < 0:
            return at + 1
        try:
            env.parse(line[at : end + 2])
        except (jinja2.TemplateSyntaxError, RecursionError):
            return at + 1
        at = line.find("{{", at + 2)
    starts = [i for i in (line.find("{{"), line.find("{%"), line.find("{#")) if i >= 0]
    return min(starts) + 1 if starts else 1
