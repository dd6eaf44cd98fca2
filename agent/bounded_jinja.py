"""A Jinja2 sandbox in which every render is bounded in time and in size.

Invariant: a render through `BoundedSandbox.render_bounded` returns at most `limits.chars`
characters within about `limits.seconds`, or raises `RenderLimitError` naming the bound; no
value built on the way grows much past `limits.chars` either. Operations whose result size
follows from their inputs (`'a' * n`, `n ** m`, `a + b`, `'%9999d' % x`, `x ~ y`, captured
blocks, `ljust`/`center`/`zfill`/`expandtabs`/`replace`/`translate`/`join`/`format`/`to_bytes`,
the `center`/`indent`/`wordwrap`/`replace`/`format`/`join`/`batch`/`slice`/`tojson` filters)
are refused *before* they allocate; every other call, filter and operator result is measured
after it returns.

How: the sandbox's hooks (calls, filters, tests, attribute and item access, the `*`, `**`, `+`
and `%` operators, `~` joins, captured blocks and each iteration of every `for` loop) check a
per-render budget held in a context variable, so renders in concurrent worker threads never
share one; the output is streamed through `Template.generate` and counted. The bounds are
enforced in-process on purpose: a render is on the hot path (each step, each approval) and a
process per render would cost more than any template a runbook needs.
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.utils import Namespace

__all__ = [
    "DEFAULT_LIMITS",
    "RENDER_CHARS",
    "RENDER_SECONDS",
    "BoundedSandbox",
    "RenderError",
    "RenderLimitError",
    "RenderLimits",
]

# A runbook template renders a command line, a URL, a note or an MCP argument: milliseconds of
# work and a few hundred characters. The bounds are far above that and far below harm.
RENDER_SECONDS = 1.0
RENDER_CHARS = 64 * 1024  # of output, and the largest value a render may build on the way
# Integers past this many bits only come from `**` or repeated `*`; their arithmetic and
# their conversion to text are what would stall a render without touching a hook.
MAX_INT_BITS = 4096
# Containers nested deeper than this are refused (a list that contains itself looks the same).
MAX_NESTING = 32
# At most this many digits in a format width, so int() of it stays trivially cheap.
_MAX_WIDTH_DIGITS = 9


class RenderError(ValueError):
    """A template could not be rendered into a command, text or URL."""


class RenderLimitError(RenderError):
    """A render went past its time or size bound; the message names the bound it hit."""

    def __init__(self, limits: RenderLimits, detail: str) -> None:
        super().__init__(f"template exceeded the render limit ({limits}): {detail}")
        self.limits = limits
        self.detail = detail


@dataclass(frozen=True)
class RenderLimits:
    """The bounds of one render: wall-clock seconds, and characters of output (a KiB here is
    1024 characters) that also cap every value built during the render."""

    seconds: float = RENDER_SECONDS
    chars: int = RENDER_CHARS

    def __post_init__(self) -> None:
        if not 0 < self.seconds < float("inf") or self.chars < 1:
            raise ValueError(
                f"render limits must be positive and finite, not {self.seconds} s / "
                f"{self.chars} characters"
            )

    @property
    def size(self) -> str:
        """The size bound as a person reads it (`64 KiB`)."""
        if self.chars % 1024 == 0:
            return f"{self.chars // 1024} KiB"
        return f"{self.chars} characters"

    def __str__(self) -> str:
        return f"{self.seconds:g} s / {self.size}"


DEFAULT_LIMITS = RenderLimits()


@dataclass(frozen=True)
class _Budget:
    """The bounds of the render running in this context, and when its time is up."""

    deadline: float
    limits: RenderLimits


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "loom_ops_render_budget", default=None
)


class _LimitExceeded(Exception):
    """A bound was hit inside a render; `render_bounded` turns it into a RenderLimitError.

    Deliberately not a ValueError: filters such as `int` and `float` catch ValueError and
    would silently swallow the stop."""


def _limits() -> RenderLimits:
    budget = _BUDGET.get()
    return budget.limits if budget is not None else DEFAULT_LIMITS


def _tick() -> None:
    """Stop the render once its deadline has passed."""
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise _LimitExceeded(f"it ran longer than {budget.limits.seconds:g} s")


def _allow(size: int, what: str) -> None:
    """Refuse a result of `size` characters/items before (or right after) it is built."""
    limits = _limits()
    if size > limits.chars:
        raise _LimitExceeded(f"{what} would be larger than {limits.size}")


def _weight(value: object, cap: int) -> int:
    """The size of a value in characters and items, nested containers counted in full.

    A list holding one string twice counts it twice, because `join`, `sum` or `~` would copy
    it twice. Counting stops as soon as the total passes `cap` (so this costs O(cap) at most).
    """
    total = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1  # about its number of decimal digits
        elif isinstance(item, list | tuple | set | frozenset | dict | Namespace):
            if isinstance(item, Namespace):
                item = object.__getattribute__(item, "_Namespace__attrs")
            assert isinstance(item, list | tuple | set | frozenset | dict)
            total += len(item)
            if total > cap:
                return total
            if depth >= MAX_NESTING:
                return cap + 1
            children: Iterable[object] = (
                [*item.keys(), *item.values()] if isinstance(item, dict) else item
            )
            stack.extend((child, depth + 1) for child in children)
        else:
            total += 1
        if total > cap:
            return total
    return total


def _checked(value: Any, what: str = "a value") -> Any:
    """`value`, once it is known to be within the size bound."""
    limits = _limits()
    _allow(_weight(value, limits.chars), what)
    return value


def _width_allowed(number: str) -> bool:
    return len(number) <= _MAX_WIDTH_DIGITS and int(number) <= _limits().chars


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[a-zA-Z%]?")


def _check_percent(template: object, args: object) -> None:
    """`'%099999999d' % 1` allocates inside one operation: check widths and reuse first."""
    if isinstance(template, bytes | bytearray):
        template = bytes(template).decode("latin-1")
    if not isinstance(template, str):
        return
    fields = 0
    for width, precision in _PERCENT_FIELD.findall(template):
        fields += 1
        for number in (width, precision):
            if number == "*" or (number and not _width_allowed(number)):
                _allow(_limits().chars + 1, "a formatted field")
    # `%(a)s` may use one argument many times: assume every field takes the largest one.
    _allow(len(template) + fields * _weight(args, _limits().chars), "the formatted text")


def _check_format(template: str, args: object) -> None:
    """The same for `str.format`: widths in format specs, and fields that reuse an argument."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return  # malformed: the call itself reports it
    fields = 0
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        fields += 1
        if spec and ("{" in spec or not all(map(_width_allowed, re.findall(r"\d+", spec)))):
            _allow(_limits().chars + 1, "a formatted field")
    _allow(len(template) + fields * _weight(args, _limits().chars), "the formatted text")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `*`, `**`, `+` and `%` whose result would be too large, before computing it."""
    cap = _limits().chars
    sequences = str | bytes | bytearray | list | tuple
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _LimitExceeded(f"a number would be larger than {MAX_INT_BITS} bits")
            return
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(count, int) and count > 0:
                _allow(_weight(seq, cap) * count, "a repeated value")
    elif operator == "**":
        powers = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
        if powers and abs(left).bit_length() * right > MAX_INT_BITS:
            raise _LimitExceeded(f"a number would be larger than {MAX_INT_BITS} bits")
    elif operator == "+":
        if isinstance(left, sequences) and isinstance(right, sequences):
            _allow(_weight(left, cap) + _weight(right, cap), "a concatenated value")
    elif operator == "%":
        _check_percent(left, right)


def _int_arg(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, key: str, default: Any
) -> int:
    value = args[i] if len(args) > i else kwargs.get(key, default)
    if not isinstance(value, int):
        raise TypeError(key)
    return value


def _replaced_size(text: Any, old: Any, new: Any, count: int) -> int:
    hits = text.count(old) if len(old) else len(text) + 1
    if count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


_PADDING = frozenset({"ljust", "rjust", "center", "zfill"})


def _call_size(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """The result size of a builtin method that can amplify its input, before it runs."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    try:
        if isinstance(owner, str | bytes | bytearray):
            if name in _PADDING:
                return max(len(owner), _int_arg(args, kwargs, 0, "width", 0))
            if name == "expandtabs":
                tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
                return len(owner) + tabs * max(_int_arg(args, kwargs, 0, "tabsize", 8), 0)
            if name == "replace":
                count = _int_arg(args, kwargs, 2, "count", -1)
                return _replaced_size(owner, args[0], args[1], count)
            if name == "join":
                items = args[0]
                return _weight(items, _limits().chars) + len(owner) * max(len(items) - 1, 0)
            if name == "translate" and isinstance(args[0], dict):
                lengths = [len(v) for v in args[0].values() if isinstance(v, str | bytes)]
                return len(owner) * max([1, *lengths])
        if isinstance(owner, int) and name == "to_bytes":
            return _int_arg(args, kwargs, 0, "length", 1)
    except (IndexError, TypeError, ValueError, AttributeError):
        return None  # a malformed call: let it fail with its own message
    return None


# -- filters ------------------------------------------------------------------------------------


def _param(
    params: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, key: str, default: Any
) -> Any:
    return params[i] if len(params) > i else kwargs.get(key, default)


def _width_of(value: Any) -> int:
    return value if isinstance(value, int) else len(str(value))


def _check_center(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    _allow(_width_of(_param(params, kwargs, 0, "width", 80)), "a padded text")
    return value


def _check_indent(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    text = str(value)
    width = _width_of(_param(params, kwargs, 0, "width", 4))
    _allow(len(text) + (text.count("\n") + 1) * width, "an indented text")
    return value


def _check_wordwrap(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    text = str(value)
    wrap = _param(params, kwargs, 2, "wrapstring", None)
    if isinstance(wrap, str) and len(wrap) > 1:
        # At most one line per character: a one-character wrapstring at most doubles the text.
        _allow(len(text) + (len(text) + 1) * len(wrap), "a wrapped text")
    return value


def _check_replace(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    old = str(_param(params, kwargs, 0, "old", ""))
    new = str(_param(params, kwargs, 1, "new", ""))
    count = _param(params, kwargs, 2, "count", None)
    limit = count if isinstance(count, int) else -1
    _allow(_replaced_size(str(value), old, new, limit), "a replaced text")
    return value


def _check_format_filter(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    _check_percent(value, (params, kwargs))
    return value


def _check_join(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    items = list(value)  # may be a generator: materialize once, hand the list on
    separator = str(_param(params, kwargs, 0, "d", ""))
    _allow(
        _weight(items, _limits().chars) + len(separator) * max(len(items) - 1, 0),
        "a joined text",
    )
    return items


def _check_batch(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    count = _param(params, kwargs, 0, "linecount", 0)
    if _param(params, kwargs, 1, "fill_with", None) is not None and isinstance(count, int):
        _allow(count, "a batch")
    return value


def _check_slice(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    count = _param(params, kwargs, 0, "slices", 0)
    if isinstance(count, int):
        _allow(count, "a slicing")
    return value


def _check_tojson(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    indent = _param(params, kwargs, 0, "indent", None)
    if indent:
        weight = _weight(value, _limits().chars)
        _allow(weight + weight * MAX_NESTING * _width_of(indent), "an indented JSON text")
    return value


_FilterCheck = Callable[[Any, tuple[Any, ...], Mapping[str, Any]], Any]
_FILTER_CHECKS: dict[str, _FilterCheck] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "format": _check_format_filter,
    "join": _check_join,
    "batch": _check_batch,
    "slice": _check_slice,
    "tojson": _check_tojson,
}


@jinja2.pass_environment
def _bounded_sum(
    environment: jinja2.Environment,
    iterable: Iterable[Any],
    attribute: str | int | None = None,
    start: Any = 0,
) -> Any:
    """Jinja's `sum`, one checked `+` at a time: summing lists is quadratic and would
    otherwise run inside one uninterruptible call."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        _tick()
        _check_binop("+", total, item)
        total = total + item
    return total


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter: deadline first, its size check (if it has one), its result measured."""
    # Filters marked pass_context/pass_eval_context/pass_environment get that object first.
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if check is not None and len(args) > skip:
            value = check(args[skip], args[skip + 1 :], kwargs)
            args = (*args[:skip], value, *args[skip + 1 :])
        return _checked(func(*args, **kwargs))

    return bounded


def _ticking(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a test: it only needs the deadline (tests answer booleans)."""

    @functools.wraps(func)
    def ticking(*args: Any, **kwargs: Any) -> Any:
        _tick()
        return func(*args, **kwargs)

    return ticking


# -- compiling ----------------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with the two constructs no sandbox hook sees routed through one:
    `for` loops (nested loops over a short string spin for hours touching nothing else) and
    `~` joins (`{% set x = x ~ x %}` doubles a text per statement)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        """Iterate through `environment.guard_loop(<iterable>)`, then loop as Jinja does.

        Jinja allows no custom node types, so the guard is a call of an environment attribute
        (a sandboxed call: the deadline is checked once more on the way)."""
        guard = nodes.EnvironmentAttribute("guard_loop", lineno=node.iter.lineno)
        node.iter = nodes.Call(guard, [node.iter], [], None, None, lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """`a ~ b` as `environment.join_text((a, b))` (autoescape is never on here)."""
        self.write("environment.join_text((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """A SandboxedEnvironment whose renders are bounded in time and size (see the module)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # lipsum(n) builds n paragraphs in one call; a runbook has no use for filler text.
        self.globals.pop("lipsum", None)
        filters = {**self.filters, "sum": _bounded_sum}
        self.filters = {name: _bounded_filter(name, func) for name, func in filters.items()}
        self.tests = {name: _ticking(func) for name, func in self.tests.items()}

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call from a template: deadline, the result size of amplifying builtins checked
        first, then the result and any container the call may have grown."""
        _tick()
        owner = getattr(obj, "__self__", None)
        joins = (
            isinstance(owner, str | bytes | bytearray) and getattr(obj, "__name__", "") == "join"
        )
        if joins and args and not isinstance(args[0], list):
            args = (list(args[0]), *args[1:])  # sized once: a generator cannot be re-read
        size = _call_size(obj, args, kwargs)
        if size is not None:
            _allow(size, "the result of a call")
        result = super().call(context, obj, *args, **kwargs)
        if isinstance(owner, list | dict | set):
            _checked(owner)  # append, extend, update... grew it in place
        return _checked(result)

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        """`*`, `**`, `+`, `%`: refused before they build a value past the bounds."""
        _tick()
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        """Attribute access, with the deadline checked."""
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        """Item access, with the deadline checked."""
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` / `format_map`, sandboxed by Jinja and sized here before they run."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _tick()
            _check_format(template, (args, kwargs))
            return str(_checked(wrapped(*args, **kwargs)))

        return bounded

    def guard_loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Every `for` loop iterates through here, checking the deadline on each round."""
        for item in iterable:
            _tick()
            yield item

    def join_text(self, parts: Iterable[Any]) -> str:
        """`a ~ b ~ c`, refused before joining when the text would be too large."""
        _tick()
        texts = [str(part) for part in parts]
        _allow(sum(map(len, texts)), "a joined text")
        return "".join(texts)

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Captured output (`{% set x %}…{% endset %}`, macros, filter blocks), counted."""
        _tick()
        cap = _limits().chars
        pieces: list[str] = []
        total = 0
        for piece in parts:
            total += len(piece)
            if total > cap:
                _allow(total, "a captured block")
            pieces.append(piece)
        return "".join(pieces)

    def render_bounded(
        self, source: str, params: Mapping[str, object], limits: RenderLimits = DEFAULT_LIMITS
    ) -> str:
        """Compile (cached) and render `source` within `limits`; any failure is a RenderError
        (RenderLimitError when a bound was hit) with a one-line message."""
        token = _BUDGET.set(_Budget(time.monotonic() + limits.seconds, limits))
        try:
            template = _compile(self, source)
            out: list[str] = []
            size = 0
            for chunk in template.generate(dict(params)):
                size += len(chunk)
                if size > limits.chars:
                    raise _LimitExceeded(f"its output is longer than {limits.size}")
                out.append(chunk)
            return "".join(out)
        except _LimitExceeded as exc:
            raise RenderLimitError(limits, str(exc)) from None
        except jinja2.UndefinedError as exc:
            raise RenderError(f"template uses an undefined value: {exc.message}") from exc
        except jinja2.TemplateError as exc:
            raise RenderError(f"template error: {exc.message or exc}") from exc
        except Exception as exc:
            # 1/0, 'a'.foo(), int('x', 99), a recursive macro...: the template's own mistake.
            message = " ".join(str(exc).split()) or "no detail"
            raise RenderError(f"template error: {type(exc).__name__}: {message}") from exc
        finally:
            _BUDGET.reset(token)


@functools.lru_cache(maxsize=1024)
def _compile(env: BoundedSandbox, source: str) -> jinja2.Template:
    """Compile once per template string: rendering is on the hot path. Compiling runs inside
    the render's budget, since Jinja folds constant filter calls at compile time."""
    return env.from_string(source)
