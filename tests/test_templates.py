"""Personalization templates (server/templates.py): syntax, helpers, missing values, and the
sandbox's bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.templates import (
    MAX_ITERATIONS,
    MAX_OUTPUT,
    MissingValue,
    TemplateError,
    TemplateLimit,
    TemplateSyntax,
    compile_condition,
    compile_field,
)

CONTEXT = {
    "profile": {"person": {"firstName": "Ana", "lastName": "Lima"}, "loyalty": {"points": 12345.5}, "identities": ["crm:42"],
                "audiences": ["vip"]},
    "event": {"type": "commerce.purchase", "total": 149.9, "items": [{"name": "Shoes"}, {"name": "Socks"}, {"name": "Hat"}],
              "when": "2025-03-04T05:06:07Z"},
    "journey": {"step": "welcome"},
    "message": {"id": "welcome", "version": 3},
}


def render(source: str, context: dict | None = None, on_missing: str = "default") -> str:
    return compile_field("$.content.body", source, on_missing).render(CONTEXT if context is None else context)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Plain text, no template", "Plain text, no template"),
        ("Hi {{ profile.person.firstName }}!", "Hi Ana!"),
        ("Hi {{ profile.person.nickname | default('friend') }}", "Hi friend"),
        ("{{ profile.person.firstName | upper }} {{ profile.person.lastName | lower }}", "ANA lima"),
        ("{% if event.total > 100 %}Free shipping{% else %}Shipping extra{% endif %}", "Free shipping"),
        ("{% for item in event.items[:2] %}{{ item.name }}{% if not loop.last %}, {% endif %}{% endfor %}", "Shoes, Socks"),
        ("{{ event.total | currency('EUR') }}", "€149.90"),
        ("{{ event.total | currency('SEK') }}", "149.90 SEK"),
        ("{{ profile.loyalty.points | number }}", "12,346"),
        ("{{ profile.loyalty.points | number(1) }}", "12,345.5"),
        ("{{ event.when | date('%d/%m/%Y') }}", "04/03/2025"),
        ("{{ coalesce(profile.person.nickname, profile.person.firstName) }}", "Ana"),
        ("{{ 'vip' in profile.audiences }}", "true"),
        ("{{ event.type }} #{{ message.version }} {{ journey.step }}", "commerce.purchase #3 welcome"),
        ("https://example.com/?q={{ 'a b&c' | url_encode }}", "https://example.com/?q=a%20b%26c"),
        ("{{ profile.missing.deeper.still }}|", "|"),
    ],
)
def test_templates_render(source: str, expected: str) -> None:
    assert render(source) == expected


def test_days_until_and_since() -> None:
    future = (datetime.now(UTC) + timedelta(days=3, hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(days=2, hours=1)).timestamp()
    assert render("{{ event.a | days_until }} {{ event.b | days_since }}", {"event": {"a": future, "b": past}}) == "4 2"


def test_plain_text_is_not_a_template() -> None:
    field = compile_field("$.title", "50% off, today only")
    assert not field.is_template and field.render({}) == "50% off, today only"


def test_a_missing_value_excludes_the_profile_when_the_message_says_so() -> None:
    with pytest.raises(MissingValue, match=r"\$\.content\.body") as caught:
        render("Hi {{ profile.person.nickname }}", on_missing="exclude")
    assert caught.value.field == "$.content.body"
    # A default still applies.
    assert render("Hi {{ profile.person.nickname | default('you') }}", on_missing="exclude") == "Hi you"


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("Hello {{ profile. }}", "line 1, column 7"),
        ("{% if %}x{% endif %}", "line 1, column 1"),
        ("ok\n{{ a }} then {{ b + }}", "line 2, column 14"),
        ("{% for x in y %}no end", "line 1"),
        ("{{ a | no_such_filter }}", "line 1"),
    ],
)
def test_a_template_that_does_not_compile_names_line_and_column(source: str, where: str) -> None:
    with pytest.raises(TemplateSyntax) as caught:
        compile_field("$.content.title", source)
    assert str(caught.value).startswith(f"$.content.title: {where}")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ profile.__class__ }}",
        "{{ lipsum.__globals__ }}",
    ],
)
def test_the_sandbox_hides_pythons_insides(source: str) -> None:
    try:
        out = render(source)
    except TemplateError:
        return
    assert "class" not in out and "module" not in out and "function" not in out


def test_templates_cannot_change_what_they_are_given() -> None:
    context = {"profile": {"tags": ["a"]}}
    with pytest.raises(TemplateError, match="not allowed"):
        render("{{ profile.tags.append('b') }}", context)
    assert context["profile"]["tags"] == ["a"]


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", f"more than {MAX_ITERATIONS} times"),
        ("{{ 'a' * 10000000 }}", "'\\*' would make"),
        ("{{ [1] * 10000000 }}", "'\\*' would make"),
        ("{{ 2 ** 10000000 }}", "exponent"),
        ("{% for i in range(1000) %}{{ 'x' * 100 }}{% endfor %}", f"more than {MAX_OUTPUT} characters"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(1) }}", "recurses too deep"),
    ],
)
def test_a_runaway_template_is_stopped(source: str, match: str) -> None:
    with pytest.raises(TemplateLimit, match=match):
        render(source)


def test_the_iteration_budget_is_per_render() -> None:
    field = compile_field("$.body", "{% for i in range(6000) %}{% endfor %}done")
    assert field.render({}) == "done"
    assert field.render({}) == "done"  # 12,000 iterations over two renders: each has its own budget


def test_errors_inside_a_render_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render("{{ 1 / 0 }}")
    with pytest.raises(TemplateError, match="OverflowError"):
        render("{{ range(10 ** 9) | list }}")


def test_values_print_as_in_json() -> None:
    context = {"event": {"n": None, "yes": True, "no": False, "items": [1, "a"], "map": {"k": 1}}}
    assert render("{{ event.n }}|{{ event.yes }}|{{ event.no }}|{{ event.items }}|{{ event.map }}", context) == '|true|false|[1,"a"]|{"k":1}'


def test_a_default_applies_below_a_missing_parent_when_missing_values_exclude() -> None:
    assert render("Hi {{ profile.person.firstName | default('you') }}", {"profile": {}}, on_missing="exclude") == "Hi you"
    with pytest.raises(MissingValue):
        render("{% if profile.person.vip %}VIP{% endif %}", {"profile": {}}, on_missing="exclude")


def test_templates_rendered_in_one_scope_stay_independent() -> None:
    from server.templates import Scope

    scope = Scope({"profile": {"name": "Ana", "points": 5}})
    condition = compile_condition("$.audience", "profile.points > 3")
    first = compile_field("$.content.title", "{% set x = 'from the title' %}{{ x }}, {{ profile.name }}")
    second = compile_field("$.content.body", "{{ x | default('nothing set') }} for {{ profile.name }}")
    excluding = compile_field("$.content.subtitle", "{{ profile.name }} {{ profile.city }}", "exclude")
    assert condition.test(scope) is True
    assert first.render(scope) == "from the title, Ana"
    assert second.render(scope) == "nothing set for Ana"  # the title's variable did not leak
    with pytest.raises(MissingValue):  # its own environment's rule for missing values
        excluding.render(scope)
    assert second.render(scope) == "nothing set for Ana"
    assert compile_condition("$.audience", "profile.city == 'Oslo'").test(scope) is False
    # Nor does the condition's own result, or a macro.
    after = compile_field("$.content.body", "{{ result | default('no result') }} {{ m is defined }}")
    assert compile_field("$.content.title", "{% macro m() %}x{% endmacro %}{{ m() }}").render(scope) == "x"
    assert after.render(scope) == "no result false"
