"""The views' one Jinja setup: templates from `agent/views/templates`, strict about undefined
names, and for HTML every value escaped, so only the templates' own tags are markup."""

from __future__ import annotations

from collections.abc import Callable

import jinja2
from markupsafe import Markup


def _tag(name: str) -> Callable[[object], Markup]:
    def wrap(value: object) -> Markup:
        # One line per tag: a long summary is split between lines, never inside a tag.
        flat = " ".join(str(value).splitlines())
        return Markup(f"<{name}>{{}}</{name}>").format(flat)  # format() escapes the value

    return wrap


def _environment(html: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("agent.views", "templates"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(
        b=_tag("b") if html else str,
        code=_tag("code") if html else str,
    )
    return env


TEXT = _environment(html=False)
HTML = _environment(html=True)
