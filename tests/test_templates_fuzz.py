"""Hostile templates from a grammar (server/templates.py): Jinja expressions, filters, methods,
operators, loops, macros and blocks over big and small numbers and texts. Whatever a template
holds, compiling and rendering it either gives a text within the output bound or raises a
TemplateError, in bounded time and memory."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import jinja2.sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.templates import MAX_OUTPUT, TemplateError, compile_condition, compile_field

#: What the templates are given: profile and event data with big texts, lists and maps.
CONTEXT: dict[str, Any] = {
    "profile": {"name": "Ana", "tags": ["a", "b"], "points": 12345, "big": "p" * 100_000},
    "event": {"n": 10**9, "m": -7, "f": 1.5e300, "s": "a\tb\nc d", "big": "x" * 200_000, "items": list(range(30_000)),
              "map": {str(i): i for i in range(20_000)}, "nested": [[[1, "a"]] * 50] * 50, "none": None},
}

NUMBERS = st.sampled_from(["0", "1", "2", "7", "-1", "63", "999", "16000", "1000000000", "10**9", "(10**999)", "1.5",
                           "1e308", "-0.5", "true", "none", "event.n", "event.m", "event.f", "profile.points"])
TEXTS = st.sampled_from(["''", "'a'", "'ab c'", "'%s'", "'%0999999d'", "'%.99999f'", "'%*d'", "'{}'", "'{:>99999999}'",
                         "'{0:{1}}'", "'\\t'", "'<&>'", "'a.com b@c.de'", "'%c'", "'%(a)s'", "event.s", "event.big",
                         "profile.big", "profile.name", "('x' * 16000)", "'{!r}'"])
SEQUENCES = st.sampled_from(["[]", "[1, 2]", "['a', 'b']", "event.items", "profile.tags", "event.nested",
                             "range(100000)", "range(5)", "event.map", "{'a': 1}", "(['x' * 16000] * 16000)", "[event.big, event.big]",
                             "namespace(a=1)", "now()", "lipsum(2)", "cycler(1, 2)", "dict(a=1)"])
FILTERS = sorted(jinja2.sandbox.ImmutableSandboxedEnvironment().filters) + [
    "currency", "number", "date", "days_until", "days_since", "url_encode"]
METHODS = ["center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate", "format", "format_map",
           "split", "upper", "title", "strip", "count", "to_bytes", "strftime", "encode", "index", "keys", "items",
           "splitlines", "partition", "startswith", "isoformat", "bit_length", "fromkeys", "copy", "next"]
BINOPS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "<", "in", "and", "or"]


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    atoms = st.one_of(NUMBERS, TEXTS, SEQUENCES, st.sampled_from(["i", "v", "w", "x", "loop.index", "m", "caller"]))
    if depth >= 3:
        return draw(atoms)
    sub = expressions(depth + 1)
    arguments = st.lists(st.one_of(sub, st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        ["width", "indent", "start", "attribute", "fill_with", "wrapstring", "target", "n", "max", "length"]), sub)),
        max_size=3).map(", ".join)
    kind = draw(st.sampled_from(["atom", "binop", "filter", "method", "slice", "unary", "cond", "item"]))
    if kind == "atom":
        return draw(atoms)
    if kind == "binop":
        return f"({draw(sub)} {draw(st.sampled_from(BINOPS))} {draw(sub)})"
    if kind == "filter":
        return f"({draw(sub)} | {draw(st.sampled_from(FILTERS))}({draw(arguments)}))"
    if kind == "method":
        return f"{draw(sub)}.{draw(st.sampled_from(METHODS))}({draw(arguments)})"
    if kind == "slice":
        return f"{draw(sub)}[{draw(NUMBERS)}:{draw(NUMBERS)}:{draw(st.sampled_from(['', '1', '-1', '3']))}]"
    if kind == "unary":
        return f"({draw(st.sampled_from(['-', 'not ']))}{draw(sub)})"
    if kind == "cond":
        return f"({draw(sub)} if {draw(sub)} else {draw(sub)})"
    return f"{draw(sub)}[{draw(st.one_of(NUMBERS, TEXTS))}]"


@st.composite
def templates(draw: st.DrawFn, depth: int = 0) -> str:
    expression = expressions()
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["output", "output", "for", "if", "set", "macro", "filter", "text", "recursive", "call", "with"]
        kind = draw(st.sampled_from(kinds if depth < 2 else ["output", "text"]))
        body = templates(depth + 1)
        if kind == "output":
            parts.append(f"{{{{ {draw(expression)} }}}}")
        elif kind == "text":
            parts.append(draw(st.sampled_from(["x", "Hi ", "\n", "{# c #}"])))
        elif kind == "for":
            parts.append(f"{{% for i in {draw(expression)} %}}{draw(body)}{{% endfor %}}")
        elif kind == "if":
            parts.append(f"{{% if {draw(expression)} %}}{draw(body)}{{% else %}}{draw(body)}{{% endif %}}")
        elif kind == "set":
            parts.append(f"{{% set v = {draw(expression)} %}}{{% set w %}}{draw(body)}{{% endset %}}"
                         "{{ v }}{{ w }}")
        elif kind == "macro":
            call = draw(st.sampled_from(["m(n + 1)", "m(n + 1) ~ m(n + 1)", "m(n * 2)", "caller() if caller else ''"]))
            parts.append(f"{{% macro m(n=0) %}}{draw(body)}{{% if n < 40 %}}{{{{ {call} }}}}{{% endif %}}"
                         f"{{% endmacro %}}{{{{ m() }}}}")
        elif kind == "filter":
            parts.append(f"{{% filter {draw(st.sampled_from(FILTERS))} %}}{draw(body)}{{% endfilter %}}")
        elif kind == "recursive":
            parts.append(f"{{% for i in {draw(expression)} recursive %}}{draw(body)}{{{{ loop({draw(expression)}) }}}}"
                         f"{{{{ loop.cycle(1, 2) }}}}{{% endfor %}}")
        elif kind == "call":
            parts.append(f"{{% macro c(x=1) %}}{{{{ caller(x) ~ caller(x) }}}}{{% endmacro %}}"
                         f"{{% call(x) c({draw(expression)}) %}}{draw(body)}{{{{ x }}}}{{% endcall %}}")
        else:
            parts.append(f"{{% with v = {draw(expression)} %}}{draw(body)}{{{{ v }}}}{{% endwith %}}")
    return "".join(parts)


def bounded(run: Any) -> None:
    """``run()`` (a compile and a render) gives a text within the output bound or raises a
    TemplateError, within a generous time and memory bound (the bounds are 50 ms of CPU and
    1,000,000 characters made; the margin is for a shared, noisy machine)."""
    tracemalloc.start()
    started = time.process_time()
    try:
        out = run()
        assert out is None or isinstance(out, (str, bool)) and (not isinstance(out, str) or len(out) <= MAX_OUTPUT)
    except TemplateError:
        pass
    finally:
        elapsed = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 2.0, f"{elapsed:.2f} s of CPU"
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(templates(), st.sampled_from(["default", "exclude"]))
def test_any_template_renders_within_bounds_or_fails_as_a_template_error(source: str, on_missing: str) -> None:
    bounded(lambda: compile_field("$.content.body", source, on_missing).render(CONTEXT))  # type: ignore[arg-type]


@SETTINGS
@given(expressions())
def test_any_condition_tests_within_bounds_or_fails_as_a_template_error(source: str) -> None:
    bounded(lambda: compile_condition("$.audience", source).test(CONTEXT))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="{}%#()[]-+*/|~.,'\" abnx01\n", max_size=4096))
def test_any_text_compiles_or_fails_as_a_template_error(source: str) -> None:
    bounded(lambda: compile_field("$.content.title", source).render(CONTEXT))
