"""Benchmark: personalization, the render of one template field and of a whole message.

    python -m bench.templates            # a few seconds; writes bench/results/templates.json

Each case is compiled once and rendered many times for the same context in this process;
the figure is the median over 7 runs of the CPU time per render (``time.process_time``).
``message`` renders a message with 3 personalized fields (`server._messages.Compiled.render`,
including the copy and conversion of the content), as the pipeline will for each profile.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from protocols import api
from server._messages import Compiled, MessageRecord, context_for
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
    path = write_results("templates", results, args.out)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
