"""The one Jinja setup of the views and the chat: each package's `templates/` folder, strict
about undefined names, and for HTML every value escaped, so only the templates' own tags are
markup."""

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


def environment(package: str, html: bool) -> jinja2.Environment:
    """The templates in `package`'s `templates/` folder, rendered the one way every view and
    the chat render: strict, trimmed, and for HTML with every value escaped."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
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


TEXT = environment("agent.views", html=False)
HTML = environment("agent.views", html=True)
