"""Benchmark: personalization, the render of one template field and of a whole message, and
what the templates that held the server cost now.

    python -m bench.templates            # a few seconds; writes bench/results/templates.json

Each case is compiled once and rendered many times for the same context in this process;
the figure is the median over 7 runs of the CPU time per render (``time.process_time``).
``message`` renders a message with 3 personalized fields (`server.messages.content.Compiled.render`,
including the copy and conversion of the content), as the pipeline will for each profile.

``hostile``: each template of issue 11 that held the server (for 4 s to over 10 minutes, up
to 3.8 GB) is compiled and rendered in a child process of its own: the wall time of both
(the median of 5 children), the child's RSS growth (its peak over its size before), and how it
ended.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from protocols import api
from server.messages.content import Compiled, MessageRecord, context_for
from server.templates import compile_field

from ._harness import machine, write_results

CONTEXT: dict[str, Any] = {
    "profile": {"person": {"firstName": "Ana", "lastName": "Lima"}, "loyalty": {"points": 12345.5}},
    "event": {"product": "red shoes", "total": 149.9, "items": [{"name": "Shoes"}, {"name": "Socks"}, {"name": "Hat"}]},
    "journey": {},
    "message": {"id": "cart", "version": 1},
}
FIELDS = {
    "variable": "Hi {{ profile.person.firstName }}!",
    "default": "Hi {{ profile.person.nickname | default('there') }}!",
    "condition": "{% if event.total > 100 %}Free shipping{% else %}Shipping extra{% endif %}",
    "currency": "Your total: {{ event.total | currency('EUR') }}",
    "loop": "{% for item in event.items %}{{ item.name }}{% if not loop.last %}, {% endif %}{% endfor %}",
}


HOSTILE = {
    "power": ("{{ ((10**999)**999)**999 }}", {}),
    "center": ("{{ 'a'|center(1000000000) }}", {}),
    "percent_width": ("{{ '%0999999999d' % 1 }}", {}),
    "percent_precision": ("{{ '%.999999999f' % 1.0 }}", {}),
    "indent_at_render": ("{{ 'a\nb' | indent(event.n) }}", {"event": {"n": 1_000_000_000}}),
}

#: Compiles and renders one template, then prints how it ended, the time and the RSS growth.
_CHILD = """
import json, sys, time
from server.templates import TemplateError, compile_field

source, context = json.loads(sys.stdin.read())
def status(key):  # kB; VmHWM is this process's peak (getrusage's can be its parent's, from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

before = status("VmRSS")
started = time.perf_counter()
try:
    outcome = f"rendered {len(compile_field('$.content.body', source).render(context))} characters"
except TemplateError as exc:
    outcome = f"{type(exc).__name__}: {exc}"
seconds = time.perf_counter() - started
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "rss_mb": (peak - before) / 1024, "outcome": outcome}))
"""


def in_child(source: str, context: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Compile and render ``source`` in a child process (a template without bounds then costs
    only that process, and the timeout): how it ended (``outcome``), in how many ``seconds``,
    and the child's peak RSS growth (``rss_mb``). Also used by tests/test_templates.py."""
    child = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([source, context]), capture_output=True,
                           text=True, timeout=timeout, check=True)
    return json.loads(child.stdout)  # type: ignore[no-any-return]


def _hostile(source: str, context: dict[str, Any]) -> dict[str, Any]:
    runs = [in_child(source, context) for _ in range(5)]
    return {"ms": round(statistics.median(r["seconds"] for r in runs) * 1000, 2),
            "rss_mb": round(max(r["rss_mb"] for r in runs), 1), "outcome": runs[0]["outcome"]}


def _per_render(render: Any, count: int) -> float:
    runs = []
    for _ in range(7):
        started = time.process_time()
        for _ in range(count):
            render()
        runs.append((time.process_time() - started) / count)
    return statistics.median(runs) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.templates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="renders per run (default 20,000)")
    parser.add_argument("--out", help="results file (default bench/results/templates.json)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "count": args.count, "us_per_render": {}}
    for name, source in FIELDS.items():
        field = compile_field("$.content.body", source)
        us = _per_render(lambda: field.render(CONTEXT), args.count)
        results["us_per_render"][name] = round(us, 2)
        print(f"{name:10} {us:6.2f} µs   {source}")
    spec = api.MessageSpec(id="cart", channel="shop", content=api.MessageContent(
        title=FIELDS["variable"], body="Your {{ event.product }} is waiting", media_url="https://cdn/{{ event.product | url_encode }}.jpg",
    ))
    compiled = Compiled(MessageRecord(message=spec, version=1, published_us=0))
    context = context_for(attributes=CONTEXT["profile"], identities=["crm:42"], event=CONTEXT["event"], message=spec, version=1)
    us = _per_render(lambda: compiled.render(context), args.count // 2)
    results["us_per_render"]["message_3_fields"] = round(us, 2)
    print(f"{'message':10} {us:6.2f} µs   3 personalized fields, copy and conversion included ({us / 3:.2f} µs a field)")
    print("\nhostile templates (a child process each, median of 5):")
    results["hostile"] = {}
    for name, (source, context) in HOSTILE.items():
        figures = results["hostile"][name] = _hostile(source, context)
        print(f"{name:18} {figures['ms']:7.2f} ms  RSS +{figures['rss_mb']:5.1f} MB  {figures['outcome'][:90]}")
    path = write_results("templates", results, args.out)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
