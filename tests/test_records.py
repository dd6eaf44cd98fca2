"""`record`: a frozen dataclass whose `==`, hash and repr are the ones `dataclass(frozen=True)`
gives, and the only way loom-ops makes a frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.records import record

REPO = Path(__file__).resolve().parent.parent

# One field: its name, then `field()`'s compare, repr and hash.
FIELD = st.tuples(st.booleans(), st.booleans(), st.sampled_from([None, True, False]))
VALUE = st.one_of(
    st.integers(), st.text(max_size=5), st.none(), st.just(math.nan), st.tuples(st.integers())
)


def _class(decorate: Any, specs: list[tuple[bool, bool, bool | None]]) -> Any:
    """A class `Row` with fields f0, f1, … as `specs` say, made by `decorate`."""
    namespace: dict[str, Any] = {"__annotations__": {}, "__doc__": "A row."}
    for i, (compare, shown, hashed) in enumerate(specs):
        namespace["__annotations__"][f"f{i}"] = "Any"
        namespace[f"f{i}"] = dataclasses.field(compare=compare, repr=shown, hash=hashed)
    return decorate(type("Row", (), namespace))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(FIELD, max_size=5).flatmap(
        lambda specs: st.tuples(
            st.just(specs),
            st.lists(VALUE, min_size=len(specs), max_size=len(specs)),
            st.lists(VALUE, min_size=len(specs), max_size=len(specs)),
        )
    )
)
def test_a_record_compares_hashes_and_shows_as_a_frozen_dataclass_does(
    case: tuple[list[tuple[bool, bool, bool | None]], list[Any], list[Any]],
) -> None:
    specs, first, second = case
    ours, theirs = _class(record, specs), _class(dataclasses.dataclass(frozen=True), specs)
    for a, b in ((first, second), (first, first), (second, first)):
        assert (ours(*a) == ours(*b)) == (theirs(*a) == theirs(*b))
        assert (ours(*a) != ours(*b)) == (theirs(*a) != theirs(*b))
    assert repr(ours(*first)) == repr(theirs(*first))
    try:
        expected: Any = hash(theirs(*first))
    except TypeError as exc:  # an unhashable value among the hashed fields
        expected = type(exc)
    if expected is TypeError:
        with pytest.raises(TypeError):
            hash(ours(*first))
    else:
        assert hash(ours(*first)) == expected


def test_a_record_is_frozen_replaceable_and_unequal_to_another_class() -> None:
    @record
    class Base:
        """A base record."""

        name: str
        count: int = 0

    @record
    class Child(Base):
        """A record extending it, as every journal event extends `Event`."""

        extra: str = ""

    row = Base("a", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del row.count  # type: ignore[misc]
    assert dataclasses.replace(row, count=2) == Base("a", 2)
    assert dataclasses.asdict(Child("a", 1, "x")) == {"name": "a", "count": 1, "extra": "x"}
    assert Base("a", 1) != Child("a", 1) and Child("a", 1) != Base("a", 1)
    assert repr(Child("a", 1, "x")).endswith("<locals>.Child(name='a', count=1, extra='x')")
    assert {Base("a", 1), Base("a", 1), Base("b")} == {Base("a", 1), Base("b")}


def test_a_records_own_methods_are_kept() -> None:
    @record
    class Loud:
        """A record with its own `==` and repr."""

        text: str

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Loud) and self.text.lower() == other.text.lower()

        def __repr__(self) -> str:
            return self.text.upper()

    @record
    class Hashed:
        """A record with its own hash."""

        text: str

        def __hash__(self) -> int:
            return 7

    assert Loud("a") == Loud("A") and repr(Loud("a")) == "A"
    assert hash(Loud("a")) == hash(("a",))  # the generated hash, as a dataclass gives
    assert hash(Hashed("x")) == 7 and Hashed("x") == Hashed("x")


def test_no_frozen_dataclass_is_made_but_by_record() -> None:
    """One way to make a frozen record in the product: a bare `dataclass(frozen=True)` would
    compile its methods again at every start."""
    pattern = re.compile(r"@(dataclasses\.)?dataclass\((.*\b)?frozen=True")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for package in ("agent", "bot")
        for path in (REPO / package).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
