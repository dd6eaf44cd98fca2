"""People and groups: who each identity (`telegram:<id>`, `cli:<login>`) is, and whom a list
of approvers or starters (`group:oncall`, `cli:sam`) admits.

The people file (`<workspace>/people.yaml`, or LOOM_OPS_PEOPLE_FILE) names each person once,
with an identity per front end and the groups they are in; one person with identities on two
front ends is one person everywhere (four eyes compares persons, not identities). Without it,
every identity is a person of its own. Either way the members of LOOM_OPS_APPROVERS and
TELEGRAM_APPROVER_IDS form the group `approvers`, so settings alone keep working.

Loading is validated like a runbook's (one line naming the file, line and field); resolving is
pure functions of the loaded `People`, which the kernel's decision rules are given.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import PeopleFileError, RunbookError
from agent.records import record
from agent.settings import Settings

if TYPE_CHECKING:
    import yaml
    from pydantic import ValidationError

    # pydantic models, built on first use (`_file_models`): typed loosely here.
    PersonEntry = Any
    PeopleFile = Any

__all__ = [
    "APPROVERS_GROUP",
    "GROUP_PREFIX",
    "People",
    "PeopleFile",
    "Person",
    "PersonEntry",
    "load_people",
    "load_people_file",
    "start_refusal",
]

# As a runbook id: a person's name and a group's name.
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
GROUP_PREFIX = "group:"
# The group the approver settings (LOOM_OPS_APPROVERS, TELEGRAM_APPROVER_IDS) fill.
APPROVERS_GROUP = "approvers"
LOGIN_PATTERN = r"[^\s:]{1,64}"  # an OS login, or LOOM_OPS_USER: no spaces, no colon
TOKEN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# The identity kinds a person may have, in the order they are shown.
IDENTITY_KINDS = ("cli", "telegram", "api")


# -- the file -----------------------------------------------------------------------------------


class _At(ValueError):
    """A problem below the validated object (`people[2].cli`): pydantic keeps it in the
    error's context, so the loader can name that field and its line."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


@functools.cache
def _file_models() -> dict[str, Any]:
    """The people file's models, `PersonEntry` and `PeopleFile`: built (and pydantic imported)
    when a file is first read, since most commands never read one (CLI start-up)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    class PersonEntry(BaseModel):
        """One person of the people file: a name, an identity per front end, groups, rights."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        name: str = Field(pattern=f"^{NAME_PATTERN}$")
        cli: str | None = Field(None, pattern=f"^{LOGIN_PATTERN}$")
        telegram: int | None = Field(None, gt=0, strict=True)
        # `api:<name>`: the service token's LOOM_OPS_API_USER (`api: http`) deciding as this
        # person, or a token's name. Tokens made with `loom-ops tokens` are theirs without it.
        api: str | None = Field(None, pattern=f"^{TOKEN_NAME_PATTERN}$")
        groups: list[str] = Field(default_factory=list)
        # A shared operations login: its CLI user may decide for another person with --as.
        may_act_for_others: bool = Field(default=False, strict=True)

        @field_validator("groups")
        @classmethod
        def _group_names(cls, value: list[str]) -> list[str]:
            for index, group in enumerate(value):
                if not re.fullmatch(NAME_PATTERN, group):
                    raise _At((index,), f"group name {group!r} must match {NAME_PATTERN}")
            return value

        def identities(self) -> list[str]:
            """This person's identities as deciders are recorded (`cli:sam`, `telegram:42`)."""
            return [
                f"{kind}:{value}"
                for kind in IDENTITY_KINDS
                if (value := getattr(self, kind)) is not None
            ]

    class PeopleFile(BaseModel):
        """The validated people file: each name and each identity belongs to one person."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        people: list[PersonEntry] = Field(default_factory=list)

        @model_validator(mode="after")
        def _one_person_each(self) -> PeopleFile:
            names: dict[str, int] = {}
            owners: dict[str, int] = {}
            problems: list[tuple[tuple[str | int, ...], str]] = []
            for index, person in enumerate(self.people):
                if person.name in names:
                    also = f"people[{names[person.name]}]"
                    problems.append(
                        (("people", index, "name"), f"duplicate name {person.name!r} (also {also})")
                    )
                names.setdefault(person.name, index)
                for kind in IDENTITY_KINDS:
                    value = getattr(person, kind)
                    if value is None:
                        continue
                    identity = f"{kind}:{value}"
                    if identity in owners:
                        other = self.people[owners[identity]].name
                        problems.append(
                            ((("people", index, kind)), f"{identity} is already {other}'s identity")
                        )
                    owners.setdefault(identity, index)
            if problems:
                raise _At(*problems[0])  # the earliest: one line, as a person fixes them
            return self

    return {"PersonEntry": PersonEntry, "PeopleFile": PeopleFile}


def __getattr__(name: str) -> Any:
    """`PersonEntry` and `PeopleFile`, as if defined here (see `_file_models`)."""
    if name in ("PersonEntry", "PeopleFile"):
        return _file_models()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_people_file(path: Path) -> PeopleFile:
    """Read and validate a people file; any problem is one PeopleFileError naming the file,
    the line and the field."""
    from pydantic import ValidationError

    try:
        root, document = _read(path)
        return _file_models()["PeopleFile"].model_validate(document)
    except ValidationError as exc:
        raise _first_error(path, root, exc) from None
    except PeopleFileError:
        raise
    except RunbookError as exc:  # from the shared YAML reader: same place, people's class
        raise PeopleFileError(exc.path, exc.line, exc.field, exc.message) from None
    except RecursionError:
        raise PeopleFileError(path, None, "", "the file is nested too deeply") from None


def _read(path: Path) -> tuple[yaml.Node, object]:
    # The runbooks' YAML reader, imported only when a file is read (to decide or start): the
    # same size bound and duplicate-key, alias-bomb and line rules, so both kinds fail alike.
    # An empty file names nobody: as if there were none.
    from agent.runbook.model import read_yaml_mapping

    return read_yaml_mapping(path, "people: [...]", empty={})


def _first_error(path: Path, root: yaml.Node, exc: ValidationError) -> PeopleFileError:
    """The validation error a person reads first (the earliest line), located in the file."""
    from agent.runbook.model import _field, _locate

    found: list[PeopleFileError] = []
    for error in exc.errors():
        loc: tuple[object, ...] = tuple(error["loc"])
        message = error["msg"]
        original = (error.get("ctx") or {}).get("error")
        if isinstance(original, _At):
            loc, message = (*loc, *original.loc), str(original)
        elif isinstance(original, ValueError):
            message = str(original)
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "extra_forbidden" and loc:
            message = _unknown_field(loc)
        line, shown = _locate(root, loc)
        found.append(PeopleFileError(path, line, _field(shown), message))
    return min(found, key=lambda e: e.line or 0)


def _unknown_field(loc: Sequence[object]) -> str:
    import difflib

    model = _file_models()["PersonEntry" if len(loc) == 3 else "PeopleFile"]
    name = str(loc[-1])
    close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
    return f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


# -- resolving ----------------------------------------------------------------------------------


@record
class Person:
    """Someone who may start or decide: a person of the file, or an identity nobody mapped
    (then its own person, named by the identity)."""

    name: str
    identities: tuple[str, ...]
    groups: frozenset[str] = frozenset()
    may_act_for_others: bool = False
    known: bool = False  # named in the people file

    def describe(self, identity: str) -> str:
        """`sam (telegram:42)` for a person of the file, else (or when the identity says the
        name already, `cli:sam`) the identity itself."""
        if not self.known or identity.partition(":")[2] == self.name:
            return identity
        return f"{self.name} ({identity})"


@record
class People:
    """Who is who: every identity the file maps, and the settings' `approvers` group.
    Pure lookups; an identity nobody mapped is a person of its own."""

    by_identity: Mapping[str, Person] = field(default_factory=dict)
    source: Path | None = None  # the people file read, if any
    # The file's people by name, those without any identity too (an API token names them).
    by_name: Mapping[str, Person] = field(default_factory=dict)

    @classmethod
    def build(
        cls, file: PeopleFile | None, approvers: Iterable[str] = (), source: Path | None = None
    ) -> People:
        """People from the file, with each of `approvers` (identities from the settings)
        added to the group `approvers`."""
        by_identity: dict[str, Person] = {}
        by_name: dict[str, Person] = {}
        for entry in file.people if file else ():
            person = Person(
                entry.name,
                tuple(entry.identities()),
                frozenset(entry.groups),
                entry.may_act_for_others,
                known=True,
            )
            by_identity.update(dict.fromkeys(person.identities, person))
            by_name[person.name] = person
        for identity in approvers:
            person = by_identity.get(identity) or Person(identity, (identity,))
            joined = Person(
                person.name,
                person.identities,
                person.groups | {APPROVERS_GROUP},
                person.may_act_for_others,
                person.known,
            )
            by_identity.update(dict.fromkeys(joined.identities, joined))
            if joined.known:
                by_name[joined.name] = joined
        return cls(by_identity, source, by_name)

    def with_tokens(self, tokens: Mapping[str, str]) -> People:
        """These people, with each API token (name → person's name, from the store) one
        more identity of its person, `api:<name>`: a decision made with it is that person's
        for approvers, groups and four eyes. The file wins where it maps the identity
        itself; a token whose person left the file stays an identity of its own."""
        if not tokens:
            return self
        by_identity = dict(self.by_identity)
        by_name = dict(self.by_name)
        for name, owner in sorted(tokens.items()):
            identity = f"api:{name}"
            person = by_name.get(owner)
            if person is None or identity in by_identity:
                continue
            grown = Person(
                person.name,
                (*person.identities, identity),
                person.groups,
                person.may_act_for_others,
                person.known,
            )
            by_identity.update(dict.fromkeys(grown.identities, grown))
            by_name[owner] = grown
        return People(by_identity, self.source, by_name)

    def person(self, identity: str) -> Person:
        """The person behind an identity (its own person when nobody mapped it)."""
        return self.by_identity.get(identity) or Person(identity, (identity,))

    def describe(self, identity: str) -> str:
        """How a message names the person behind `identity`: `sam (telegram:42)`, or the
        identity itself."""
        return self.person(identity).describe(identity)

    def same_person(self, first: str, second: str) -> bool:
        """True when both identities are one person (four eyes compares persons)."""
        return self.person(first).name == self.person(second).name

    def admits(self, identity: str, entries: Iterable[str]) -> bool:
        """True when one of `entries` names the person behind `identity`: by one of their
        identities, or by a group they are in (`group:oncall`)."""
        person = self.person(identity)
        for entry in entries:
            if entry.startswith(GROUP_PREFIX):
                if entry.removeprefix(GROUP_PREFIX) in person.groups:
                    return True
            elif self.person(entry).name == person.name:
                return True
        return False

    def may_act_for_others(self, identity: str) -> bool:
        """True when the people file lets this identity (a shared login) act as another."""
        return self.person(identity).may_act_for_others

    def on(self, front_end: str) -> list[str]:
        """Every identity known on one front end (`telegram`, `cli`, `api`), sorted."""
        return sorted(i for i in self.by_identity if i.startswith(f"{front_end}:"))


def start_refusal(
    people: People, requester: str, runbook_id: str, starters: Sequence[str]
) -> str | None:
    """Why `requester` may not start the runbook (one line), or None: a runbook without
    `starters` may be started by whoever may start runs."""
    if not starters or people.admits(requester, starters):
        return None
    return (
        f"{people.describe(requester)} may not start runbook {runbook_id} "
        f"(starters: {', '.join(starters)})"
    )


def load_people(settings: Settings) -> People:
    """The people in force: the people file (required only when LOOM_OPS_PEOPLE_FILE names
    it) and the approver settings as group `approvers`; PeopleFileError for a bad file."""
    path = settings.people_path
    file = None
    if settings.people_file is not None or path.exists():
        file = load_people_file(path)
    approvers = [a for a in settings.approvers if not a.startswith(GROUP_PREFIX)]
    approvers += [f"telegram:{user_id}" for user_id in settings.telegram_approvers]
    return People.build(file, approvers, path if file is not None else None)
