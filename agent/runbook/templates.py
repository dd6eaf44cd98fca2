"""A Jinja2 sandbox in which every render is bounded in time and in size.

Invariant: a render through `BoundedSandbox.render_bounded` returns at most `limits.chars`
characters within about `limits.seconds` of its thread's CPU time (and WALL_FACTOR times that
on the wall clock), or raises `RenderLimitError` naming the bound; no value built on the way
grows much past `limits.chars` either. Operations whose result size follows from their inputs
(`'a' * n`, `n ** m`, `a + b`, `'%9999d' % x`, `x ~ y`, captured blocks,
`ljust`/`center`/`zfill`/`expandtabs`/`replace`/`translate`/`join`/`format`/`to_bytes`, the
`center`/`indent`/`wordwrap`/`replace`/`format`/`join`/`batch`/`slice`/`tojson` filters) are
refused *before* they allocate; every other call, filter and operator result is measured after
it returns.

Numbers are bounded too: every int and float a template holds (its literals, its params, the
arguments and results of its calls, filters and operators, the items its loops and `range`s
yield) stays within +-2**53, and complex numbers, infinities and NaN are refused. Larger numbers
are what makes hash collisions cheap (multiples of 2**61 - 1 all hash to 0, so inserting n of
them into a dict costs n**2 comparisons inside one C call that holds the GIL), and no command
line needs them: a bigger value, such as a nanosecond timestamp, can be a string param. The
containers that still take attacker-chosen hashables in bulk (crafted tuples, ranges) are
checked before they are built: `dict()`, `dict.fromkeys`, any call on a dict, set or dict view,
set operators and the `unique` filter refuse more than `MAX_SAME_HASH` distinct keys sharing one
hash value. A template's source is at most `MAX_SOURCE_CHARS` long, which bounds what its
literals alone can cost (Python's compiler hashes every constant tuple in one call). Two single
calls whose cost no size shows are refused too: `round` to more than 400 digits, and `encode` /
`decode` with a codec other than utf-8, ascii, latin-1, utf-16 or utf-32.

How: the sandbox's hooks (calls, filters, tests, attribute and item access, every binary
operator, `~` joins, captured blocks and each iteration of every `for` loop) check a
per-render budget held in a context variable, so renders in concurrent worker threads never
share one; the output is streamed through `Template.generate` and counted. The bounds are
enforced in-process on purpose: a render is on the hot path (each step, each approval) and a
process per render would cost more than any template a runbook needs.
"""

from __future__ import annotations

import codecs
import contextvars
import functools
import re
import string
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from itertools import chain
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import ignore_case, make_attrgetter
from jinja2.utils import Namespace

from agent.errors import RenderError, RenderLimitError
from agent.records import record

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_NUMBER",
    "MAX_SAME_HASH",
    "MAX_SOURCE_CHARS",
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
# A render stops after its seconds of CPU, or this many times as long on the wall clock,
# whichever comes first (see _Budget).
WALL_FACTOR = 3
RENDER_CHARS = 64 * 1024  # of output, and the largest value a render may build on the way
# The largest magnitude of a number in a template: every integer up to it is exact as a float
# (and in JSON), and distinct ints and floats up to it have distinct hashes (an int's hash is
# its value modulo 2**61 - 1), so only crafted tuples can still collide.
MAX_NUMBER = 2**53
_NUMBER_BOUND = "numbers within \u00b12**53"
_NUMBER_TYPES = (int, float, complex)
# More distinct keys than this with one hash value are refused before a dict or set is built
# from them. Real keys never share a hash (strings are hash-randomized, small ints hash to
# themselves), while n colliding keys cost n**2 / 2 comparisons in one C call: 16 cost nothing.
MAX_SAME_HASH = 16
# The longest template source. A runbook template is a command, a URL, a note or an MCP
# argument; literals alone (a list of 600 crafted tuples fits in 16 KiB) cost Python's compiler
# about 10 ms at this size, 90 ms at 64 KiB.
MAX_SOURCE_CHARS = 16 * 1024
# Hashes are grouped on their low 61 bits: ints below 2**61 - 1 hash to themselves, so the dict
# that counts them cannot itself be made to collide.
_HASH_BITS = (1 << 61) - 1
# `round` with a precision of +-10**8 computes 10**(10**8) inside one call; a float has at
# most 324 digits after the point, and 10**400 takes microseconds.
_MAX_ROUND_DIGITS = 400
# The codecs `encode`/`decode` may use: implemented in C and linear. Others run Python code the
# deadline never sees, punycode in quadratic time (8000 characters: 8 s).
_CODECS = frozenset(
    {"utf-8", "ascii", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"}
    | {"utf-32-be"}
)
_CODECS_BOUND = "codecs utf-8, ascii, latin-1, utf-16, utf-32"
# Containers nested deeper than this are refused (a list that contains itself looks the same).
MAX_NESTING = 32
# At most this many digits in a format width, so int() of it stays trivially cheap.
_MAX_WIDTH_DIGITS = 9


@record
class RenderLimits:
    """The bounds of one render: seconds of its thread's CPU time (what the template makes
    us compute; a render waiting for a core is not charged, up to WALL_FACTOR times as long),
    and characters of output (a KiB here is 1024 characters) that also cap every value built
    during the render."""

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


class _Budget:
    """The bounds of the render running in this context, and when its time is up.

    The bound is the rendering thread's CPU time, so a render starved of the CPU on a loaded
    machine, or in a process stopped for a while, is not refused for the time it waited;
    and a wall-clock ceiling, WALL_FACTOR times as long, so that renders contending for the
    GIL (a burst of bombs, each waiting while the others run) hold their threads, shared
    with the process's other work, only so long. Reading the CPU clock is a system call, ten
    times the cost of the monotonic clock every tick reads: it is read only once the wall
    `deadline` has passed (a thread's CPU time never grows faster than wall time), and the
    deadline then moves by the CPU time still unspent."""

    __slots__ = ("ceiling", "cpu_deadline", "deadline", "limits")

    def __init__(self, limits: RenderLimits) -> None:
        now = time.monotonic()
        self.limits = limits
        self.deadline = now + limits.seconds
        self.ceiling = now + WALL_FACTOR * limits.seconds
        self.cpu_deadline = time.thread_time() + limits.seconds

    def overrun(self, now: float) -> str | None:
        """Past the wall deadline (`now`): why the render must stop, or None, and the
        deadline moves to the earliest instant it could have to."""
        left = self.cpu_deadline - time.thread_time()
        if left <= 0:
            return f"it ran longer than {self.limits.seconds:g} s"
        if now >= self.ceiling:
            seconds = WALL_FACTOR * self.limits.seconds
            return f"it ran longer than {seconds:g} s, most of it waiting for the CPU"
        self.deadline = min(now + left, self.ceiling)
        return None


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "loom_ops_render_budget", default=None
)


class _LimitExceeded(Exception):
    """A bound was hit inside a render; `render_bounded` turns it into a RenderLimitError.
    `bound` names it when it is not the render's time and size.

    Deliberately not a ValueError: filters such as `int` and `float` catch ValueError and
    would silently swallow the stop."""

    def __init__(self, detail: str, bound: str | None = None) -> None:
        super().__init__(detail)
        self.bound = bound


def _limits() -> RenderLimits:
    budget = _BUDGET.get()
    return budget.limits if budget is not None else DEFAULT_LIMITS


def _tick() -> None:
    """Stop the render once it has used its seconds of CPU, or its wall-clock ceiling."""
    budget = _BUDGET.get()
    if (
        budget is not None
        and (now := time.monotonic()) > budget.deadline
        and (why := budget.overrun(now))
    ):
        raise _LimitExceeded(why)


def _allow(size: int, what: str) -> None:
    """Refuse a result of `size` characters/items before (or right after) it is built."""
    limits = _limits()
    if size > limits.chars:
        raise _LimitExceeded(f"{what} would be larger than {limits.size}")


def _shown(number: complex) -> str:
    """A refused number as a message shows it (huge ints cannot even be converted to text)."""
    if isinstance(number, complex):
        return f"the complex number {number!r}"
    if isinstance(number, int) and number.bit_length() > 128:
        return f"a {number.bit_length()}-bit integer"
    return repr(number)


def _check_number(value: object, what: str, holds: bool = False) -> None:
    """Refuse an int or float beyond +-MAX_NUMBER (or NaN), or any complex number.

    Cheap enough for every argument, item and attribute a template touches (a tuple of types:
    isinstance() with `int | float | complex` takes ten times as long)."""
    if not isinstance(value, _NUMBER_TYPES):
        return
    if isinstance(value, complex) or not -MAX_NUMBER <= value <= MAX_NUMBER:  # NaN fails too
        verb = "holds" if holds else "is"
        raise _LimitExceeded(f"{what} {verb} {_shown(value)}", _NUMBER_BOUND)


def _weight(value: object, cap: int, what: str = "a value") -> int:
    """The size of a value in characters and items, nested containers counted in full; every
    number on the way is checked against MAX_NUMBER (`what` names the value if one is not).

    A list holding one string twice counts it twice, because `join`, `sum` or `~` would copy
    it twice. Counting stops as soon as the total passes `cap` (so this costs O(cap) at most).
    """
    total = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif isinstance(item, _NUMBER_TYPES):
            _check_number(item, what, holds=depth > 0)
            if isinstance(item, int):
                total += item.bit_length() // 3 + 1  # about its number of decimal digits
            else:
                total += 1
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
    """`value`, once it is known to be within the size bound and to hold no number past
    MAX_NUMBER."""
    limits = _limits()
    _allow(_weight(value, limits.chars, what), what)
    return value


def _hashed(value: object) -> Iterator[object]:
    """What a dict or set hashes when `value` is merged into it or looked up: a mapping's
    keys, an iterable's items, or `value` itself. The first item of every 2-item sequence is
    yielded too, since `dict()` and `update()` take (key, value) pairs; counting it where it is
    not a key only ever makes the collision check stricter."""
    if isinstance(value, str | bytes | bytearray | type) or not isinstance(value, Iterable):
        yield value
        return
    for item in value:
        yield item
        if isinstance(item, list | tuple) and len(item) == 2:
            yield item[0]


def _refuse_collisions(values: Iterable[object], what: str) -> None:
    """Refuse more than MAX_SAME_HASH distinct hashable values with one hash value, before
    `what` puts them in one dict or set: there, each would be compared with all the others
    inside a single C call. Equal values are counted once (a dict keeps one of them)."""
    groups: dict[int, list[object]] = {}
    for value in values:
        try:
            code = hash(value) & _HASH_BITS
        except TypeError:
            continue  # unhashable: the call itself reports it
        group = groups.setdefault(code, [])
        if value in group:  # at most MAX_SAME_HASH comparisons
            continue
        if len(group) == MAX_SAME_HASH:
            raise _LimitExceeded(
                f"{what} was given more than {MAX_SAME_HASH} distinct keys with one hash "
                "(a hash-collision attack)",
                f"{MAX_SAME_HASH} keys per hash value",
            )
        group.append(value)


def _materialized(value: Any) -> Any:
    """An iterator as a list (so it can be checked and still be handed on), else `value`."""
    return list(value) if isinstance(value, Iterator) else value


_HASHING_KINDS = (dict, set, frozenset)
# The dict and set methods that take whole iterables of keys; the others take one key.
_BULK_METHODS = frozenset(
    {
        "fromkeys",
        "update",
        "union",
        "intersection",
        "intersection_update",
        "difference",
        "difference_update",
        "symmetric_difference",
        "symmetric_difference_update",
        "issubset",
        "issuperset",
        "isdisjoint",
    }
)


def _refuse_colliding_keys(func: Any, owner: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuse a call that would hash colliding keys into (or look them up in) a dict or set;
    return its arguments, iterators read into lists when the call takes whole iterables.

    The calls: `dict(...)`, `dict.fromkeys` (bound to the class), any method of a dict, set or
    dict view, and `dict.update(d, ...)` (unbound: its class is in `__objclass__`, the dict is
    its first argument). The container's own keys count too: a key added to it meets them."""
    unbound = getattr(func, "__objclass__", None) in _HASHING_KINDS
    builder = any(func is kind or owner is kind for kind in _HASHING_KINDS)
    if not (unbound or builder or isinstance(owner, dict | AbstractSet)):
        return args
    name = getattr(func, "__name__", "")
    bulk = any(func is kind for kind in _HASHING_KINDS) or name in _BULK_METHODS
    if bulk:
        args = tuple(map(_materialized, args))  # read here, then handed on
    container, keys = (args[0], args[1:]) if unbound and args else (owner, args)
    values = chain.from_iterable(map(_hashed, keys)) if bulk else iter(keys)
    qualname = getattr(func, "__qualname__", None) or name or "a call"
    _refuse_collisions(chain(_hashed(container), values), f"{qualname}()")
    return args


def _codec_allowed(func: Any, owner: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """`str.encode` / `bytes.decode` only with a linear-time C codec."""
    if not isinstance(owner, str | bytes | bytearray):
        return
    if getattr(func, "__name__", "") not in ("encode", "decode"):
        return
    name = args[0] if args else kwargs.get("encoding", "utf-8")
    try:
        codec = codecs.lookup(name).name if isinstance(name, str) else None
    except LookupError:
        return  # the call reports the unknown codec itself
    if codec not in _CODECS:
        raise _LimitExceeded(f"the {name!r} codec is not one of them", _CODECS_BOUND)


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
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(count, int) and count > 0:
                _allow(_weight(seq, cap) * count, "a repeated value")
    elif operator == "**":
        # |left| ** right >= 2 ** ((bits - 1) * right): refused before computing a number that
        # could have millions of digits. Below that, the result has at most 2 * 53 bits.
        powers = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
        if powers and (abs(left).bit_length() - 1) * right > MAX_NUMBER.bit_length() - 1:
            raise _LimitExceeded(f"{left} ** {right} would be larger", _NUMBER_BOUND)
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


def _check_round(value: Any, params: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    precision = _param(params, kwargs, 0, "precision", 0)
    if isinstance(precision, int) and abs(precision) > _MAX_ROUND_DIGITS:
        raise _LimitExceeded(
            f"round() to {precision} digits", f"rounding to at most {_MAX_ROUND_DIGITS} digits"
        )
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
    "round": _check_round,
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


@jinja2.pass_environment
def _bounded_unique(
    environment: jinja2.Environment,
    value: Iterable[Any],
    case_sensitive: bool = False,
    attribute: str | int | None = None,
) -> Iterator[Any]:
    """Jinja's `unique`, its keys checked for collisions before any goes into its set: the
    original adds them one by one inside whatever single call consumes it (`|list`)."""
    getter = make_attrgetter(
        environment, attribute, postprocess=None if case_sensitive else ignore_case
    )
    items = list(value)
    keys = [getter(item) for item in items]
    _refuse_collisions(keys, "the unique filter")
    return _first_of_each(items, keys)


def _first_of_each(items: list[Any], keys: list[Any]) -> Iterator[Any]:
    """The items whose key was not seen before, in order (a generator, as Jinja's is)."""
    seen = set()
    for item, key in zip(items, keys, strict=True):
        if key not in seen:
            seen.add(key)
            yield item


def _check_arguments(args: Iterable[Any], what: str) -> None:
    """Every number handed to a call, filter or test within MAX_NUMBER (containers were
    checked when they were built)."""
    for value in args:
        _check_number(value, what)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter: deadline first, its arguments and size check (if it has one), its
    result measured."""
    # Filters marked pass_context/pass_eval_context/pass_environment get that object first.
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0
    check = _FILTER_CHECKS.get(name)
    what = f"an argument of the {name} filter"
    result = f"the result of the {name} filter"

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_arguments(chain(args[skip:], kwargs.values()), what)
        if check is not None and len(args) > skip:
            value = check(args[skip], args[skip + 1 :], kwargs)
            args = (*args[:skip], value, *args[skip + 1 :])
        return _checked(func(*args, **kwargs), result)

    return bounded


def _ticking(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a test: the deadline and its arguments (tests answer booleans)."""
    what = f"an argument of the {name} test"

    @functools.wraps(func)
    def ticking(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_arguments(chain(args, kwargs.values()), what)
        return func(*args, **kwargs)

    return ticking


# -- compiling ----------------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with the two constructs no sandbox hook sees routed through one:
    `for` loops (nested loops over a short string spin for hours touching nothing else) and
    `~` joins (`{% set x = x ~ x %}` doubles a text per statement); and every number literal
    checked against MAX_NUMBER before any code exists."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        """Refuse a template whose literals hold a number past MAX_NUMBER. Checked on the
        parsed tree, before Jinja's optimizer folds constants: whatever it folds later comes
        from these literals through sandboxed (and checked) filters."""
        for const in node.find_all(nodes.Const):
            _check_number(const.value, "a number in the template")
        super().visit_Template(node, frame)

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
    """A SandboxedEnvironment whose renders are bounded in time and size, whose numbers are
    bounded in magnitude and whose dicts and sets refuse colliding keys (see the module)."""

    code_generator_class = _BoundedCodeGenerator
    # All of them: `*`, `**`, `+`, `%` can build huge values, and every result is checked
    # against MAX_NUMBER (`-`, `/` and `//` included: 2**53 - -1, 1 / 1e-300).
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # lipsum(n) builds n paragraphs in one call; a runbook has no use for filler text.
        self.globals.pop("lipsum", None)
        filters = {**self.filters, "sum": _bounded_sum, "unique": _bounded_unique}
        self.filters = {name: _bounded_filter(name, func) for name, func in filters.items()}
        self.tests = {name: _ticking(name, func) for name, func in self.tests.items()}

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call from a template: deadline and arguments, the result size of amplifying
        builtins and the keys of dict and set builders checked first, then the result and any
        container the call may have grown."""
        _tick()
        _check_arguments(chain(args, kwargs.values()), "an argument of a call")
        owner = getattr(obj, "__self__", None)
        joins = (
            isinstance(owner, str | bytes | bytearray) and getattr(obj, "__name__", "") == "join"
        )
        if joins and args and not isinstance(args[0], list):
            args = (list(args[0]), *args[1:])  # sized once: a generator cannot be re-read
        args = _refuse_colliding_keys(obj, owner, args)
        _codec_allowed(obj, owner, args, kwargs)
        size = _call_size(obj, args, kwargs)
        if size is not None:
            _allow(size, "the result of a call")
        result = super().call(context, obj, *args, **kwargs)
        if isinstance(owner, list | dict | set):
            _checked(owner)  # append, extend, update... grew it in place
        return _checked(result, "the result of a call")

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        """Every binary operator: `*`, `**`, `+`, `%` refused before they build a value past
        the bounds, a set operation (`d.keys() - x`) before it hashes colliding keys, and every
        result measured."""
        _tick()
        _check_binop(operator, left, right)
        if isinstance(left, AbstractSet) or isinstance(right, AbstractSet):
            left, right = _materialized(left), _materialized(right)
            _refuse_collisions(chain(_hashed(left), _hashed(right)), f"`{operator}`")
        result = super().call_binop(context, operator, left, right)
        return _checked(result, f"the result of `{operator}`")

    def getattr(self, obj: Any, attribute: str) -> Any:
        """Attribute access, with the deadline and the number it may give checked."""
        _tick()
        value = super().getattr(obj, attribute)
        if isinstance(value, _NUMBER_TYPES):  # the message is only built for numbers
            _check_number(value, f"attribute {attribute!r}")
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        """Item access, with the deadline and the number it may give checked."""
        _tick()
        value = super().getitem(obj, argument)
        _check_number(value, "an item")
        return value

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
            _check_number(item, "a loop item")
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
        token = _BUDGET.set(_Budget(limits))
        try:
            if len(source) > MAX_SOURCE_CHARS:
                raise _LimitExceeded(
                    f"its source has {len(source)} characters",
                    f"templates up to {MAX_SOURCE_CHARS // 1024} KiB",
                )
            for name, value in params.items():
                # Params are values from outside: numbers anywhere in them are checked here,
                # sizes are the caller's business (a param is used whole, never rebuilt).
                _weight(value, sys.maxsize, f"param {name!r}")
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
            raise RenderLimitError(exc.bound or str(limits), str(exc)) from None
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
