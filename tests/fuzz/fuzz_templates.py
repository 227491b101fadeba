"""Coverage-guided fuzzing of the template engine, `server.templates` (atheris).

    .venv/bin/python tests/fuzz/fuzz_templates.py -max_total_time=60

The input's first byte chooses a field (``on_missing`` default or exclude) or a condition,
the rest (as UTF-8) is its source. Whatever the source: compiling raises nothing but a
`TemplateError`; rendering the field against profile and event data with big texts, lists
and maps gives a text of at most `MAX_OUTPUT` characters or raises a `TemplateError`; testing
the condition gives a bool or raises one; all of it within 2 s of CPU (the bounds are 50 ms
of render and about 20 ms of compile; the margin is for a shared machine and atheris's
instrumentation, which slows Jinja's Python several times).
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["server", "jinja2", "markupsafe"]):
    import jinja2.sandbox

    from server.templates import MAX_OUTPUT, TemplateError, compile_condition, compile_field

from _fuzz import bounded, main

CONTEXT: dict[str, Any] = {
    "profile": {"name": "Ana", "tags": ["a", "b"], "points": 12345, "big": "p" * 100_000,
                "person": {"firstName": "Ana"}, "audiences": ["vip"]},
    "event": {"n": 10**9, "m": -7, "f": 1.5e300, "s": "a\tb\nc d", "big": "x" * 200_000, "items": list(range(30_000)),
              "map": {str(i): i for i in range(20_000)}, "nested": [[[1, "a"]] * 50] * 50, "none": None,
              "total": 42.5, "date": "2026-12-08T00:00:00Z"},
    "journey": {"step": 1},
    "message": {"id": "m", "version": 1},
}


@bounded(2.0)
def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, source = data[0] % 3, data[1:].decode("utf-8", "replace")
    try:
        if mode == 2:
            assert type(compile_condition("$.audience", source).test(CONTEXT)) is bool
        else:
            out = compile_field("$.content.body", source, "default" if mode == 0 else "exclude").render(CONTEXT)
            assert isinstance(out, str) and len(out) <= MAX_OUTPUT, len(out)
    except TemplateError as exc:
        assert exc.field in ("$.audience", "$.content.body"), exc


SOURCES = [
    "Hi {{ profile.person.firstName | default('there') }}!",
    "{% if event.total > 100 %}Free shipping{% else %}{{ event.total | currency('EUR') }}{% endif %}",
    "{% for item in event.items[:3] %}{{ item }}{% if not loop.last %}, {% endif %}{% endfor %}",
    "{{ event.big | truncate(20) }} {{ '%05d' % event.n }} {{ event.s.center(40) }} {{ profile.tags | join(', ') }}",
    "{% macro m(n=0) %}{{ n }}{% if n < 5 %}{{ m(n + 1) }}{% endif %}{% endmacro %}{{ m() }}",
    "{% set v = event.map | length %}{{ v | number }} {{ event.date | date('%d %b') }} {{ now() | days_since }}",
    "{% for i in event.nested recursive %}{{ loop.depth }}{{ loop(i) if i is iterable and i is not string }}{% endfor %}",
    "{{ event.missing.deeper }}{{ coalesce(event.none, 'x') }} {{ profile.name ~ '!' * 3 }} {{ 2 ** 10 }}",
    "{% filter upper %}{{ lipsum(1) }}{% endfilter %}{% call(x) c() %}{{ x }}{% endcall %}",
    "{{ '{:>10}'.format(profile.name) }} {{ event.s | replace('a', 'bb') }} {{ event.items | sum }}",
]
CONDITIONS = ["profile.points > 1000 and 'vip' in profile.audiences", "event.n // 7 == 3 or not event.none",
              "profile.tags | length > 1", "event.missing > 1", "(event.items | select('odd') | list)[:3] == [1, 3, 5]"]

FILTERS = sorted(jinja2.sandbox.ImmutableSandboxedEnvironment().filters) + [
    "currency", "number", "date", "days_until", "days_since", "url_encode"]
TOKENS = [t.encode() for t in (
    "{{", "}}", "{%", "%}", "{#", "#}", "for ", " in ", "endfor", "if ", "else", "elif", "endif", "set ", "endset",
    "macro ", "endmacro", "call", "endcall", "filter ", "endfilter", "with ", "endwith", "recursive", "loop.",
    "caller()", " | ", "~", "**", "//", "%", "(", ")", "[", "]", ":", ",", "'", "profile.", "event.", "items", "big",
    "map", "nested", "range(", "lipsum(", "cycler(", "namespace(", "dict(", "now()", "coalesce(", ".format(",
    ".center(", ".ljust(", ".zfill(", ".join(", ".replace(", ".split(", ".expandtabs(", "is ", "not ", "and ", "or ",
    "true", "none", "10**9", "'%s'", "'%0999d'", "'{:>999}'", "16000", *FILTERS)]

if __name__ == "__main__":
    main(test_one_input, [b"\x00" + s.encode() for s in SOURCES] + [b"\x01" + s.encode() for s in SOURCES[:3]]
         + [b"\x02" + s.encode() for s in CONDITIONS], TOKENS)
    sys.exit(0)
