"""The database under the store: SQLite (embedded, the default) or PostgreSQL (shared).

`RunStore` writes its SQL once, with `?` placeholders and the `Dialect` below for the few
expressions the two engines spell differently. Each engine runs a transaction as one plain
function on a thread of its own connection(s), so a transaction's statements never interleave
with another's and nothing in it awaits the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any, Protocol, TypeVar

from agent.errors import SchemaTooNew
from agent.records import record

T = TypeVar("T")


# Channels a commit announces on, so that other processes sharing the database wake at once.
RUNS_CHANNEL = "loom_ops_runs"  # a run became runnable (queued)
OUTBOX_CHANNEL = "loom_ops_outbox"  # a chat message was queued
JOURNAL_CHANNEL = "loom_ops_journal"  # events were appended to a run (payload: run id),
# sent by the database itself at the commit (PostgreSQL: migration 0025)


class Row(Protocol):
    """A row, read by column name (`row["status"]`); both engines return rows like this."""

    def __getitem__(self, key: str | int) -> Any: ...


class Cursor(Protocol):
    """What a transaction body reads back from a statement (a DB-API cursor)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class Connection(Protocol):
    """What a transaction body may do: run statements written with `?` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...


@record
class Dialect:
    """The SQL the two engines spell differently."""

    name: str
    json_text: Callable[[str, str], str]  # a JSON text column's string field
    json_int: Callable[[str, str], str]  # a JSON text column's integer field
    json_true: Callable[[str, str], str]  # a JSON text column's boolean field is true
    skip_locked: str  # row locks for a claim that passes over rows others hold
    for_update: str  # a row read now and written later in the same transaction


SQLITE = Dialect(
    name="sqlite",
    json_text=lambda column, key: f"json_extract({column}, '$.{key}')",
    json_int=lambda column, key: f"json_extract({column}, '$.{key}')",
    json_true=lambda column, key: f"json_extract({column}, '$.{key}') = 1",  # true reads 1
    skip_locked="",  # one writer at a time: nothing to skip, nothing to lock
    for_update="",
)

POSTGRES = Dialect(
    name="postgresql",
    json_text=lambda column, key: f"(({column})::jsonb ->> '{key}')",
    json_int=lambda column, key: f"((({column})::jsonb ->> '{key}')::bigint)",
    json_true=lambda column, key: f"((({column})::jsonb ->> '{key}') = 'true')",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    for_update=" FOR UPDATE",
)


class Leadership(Protocol):
    """One process among several leads (e.g. polls Telegram); a standby waits to take over."""

    async def acquire(self) -> None:
        """Wait until this process leads."""
        ...

    async def lost(self) -> None:
        """Return when the lead can no longer be trusted."""
        ...

    async def release(self) -> None:
        """Stop leading (a standby takes over)."""
        ...


class Database(Protocol):
    """One engine's connections: transactions, reads, notifications and the schema."""

    label: str  # what error messages call the database (a path, or a URL without password)
    dialect: Dialect

    async def transaction(
        self, fn: Callable[[Connection], T], durable: bool = False, brief: bool = False
    ) -> T:
        """Run `fn` as one transaction that behaves as if it ran alone (`fn` may run again
        on a conflict); `durable` waits for the commit to reach the disk; `brief` says `fn`
        does a small, bounded amount of work (a step's writes), which an engine may do right
        on the event loop's thread."""
        ...

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` over one consistent snapshot, writing nothing."""
        ...

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """In a transaction: tell other processes at commit (nothing on SQLite)."""
        ...

    def expect(
        self,
        conn: Connection,
        sql: str,
        params: Sequence[Any],
        rows: int,
        otherwise: Callable[[], Exception],
    ) -> None:
        """In a transaction: run an INSERT or UPDATE that must change exactly `rows` rows;
        else the transaction fails with `otherwise()`, by its commit at the latest (PostgreSQL
        checks on the server, so the check waits for no answer of its own)."""
        ...

    async def listen(self, on_notice: Callable[[str, str], None], channels: Sequence[str]) -> None:
        """Call `on_notice(channel, payload)` for other processes' commits on `channels`
        until cancelled."""
        ...

    def leadership(self, name: str) -> Leadership:
        """The right to be the one process that does `name` among those sharing the store."""
        ...

    async def schema_version(self) -> int:
        """The schema version the database is at."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...


def migrations(package: str) -> list[tuple[int, str]]:
    """Numbered migrations (`0001_name.sql`) shipped in a package, in order."""
    found = []
    for entry in resources.files(package).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def too_new(label: str, current: int, known: int) -> SchemaTooNew:
    """The error for a database a newer loom-ops wrote."""
    return SchemaTooNew(
        f"database {label} has schema version {current}, newer than the {known} this "
        "loom-ops knows; upgrade loom-ops"
    )


def is_postgres_url(url: str) -> bool:
    """True for `postgresql://…` and `postgres://…` URLs."""
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(url: str) -> str:
    """The file a SQLite setting names: a plain path, or `sqlite:///path`. Any other URL
    (`mysql://…`) is refused rather than taken for a path: a directory `mysql:` would hold a
    fresh SQLite store, and every command would work against it."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :] or ":memory:"
    if url.startswith("sqlite://"):
        raise ValueError(f"{url}: write sqlite:///relative/path or sqlite:////absolute/path")
    scheme = _URL_SCHEME.match(url)
    if scheme:
        raise ValueError(
            f"{redact_url(url)}: loom-ops stores runs in SQLite (a path, or sqlite:///path) or "
            f"PostgreSQL (postgresql://…), not {scheme.group(1)}://"
        )
    return url


def redact_url(url: str) -> str:
    """The URL with its password hidden (`user:***@`, `password=***`), for messages and logs."""
    hidden = re.sub(r"(://[^:/@]*):[^/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", hidden)


# What starts a URL (RFC 3986's scheme): a path starts so only on purpose (`./a://b` does not).
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
