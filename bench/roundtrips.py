"""Counting a process's store round trips, for the benchmarks (never for production code).

Two counts, each by the store method that made it (its label, e.g.
`agent.store.calls:RunStore.begin_tool_call`):

- store calls: `Database.transaction()` and `Database.read()`, on either engine (`count_store`).
  On SQLite each is one round trip: a hop to the database thread and one transaction.
- PostgreSQL network round trips (`count_postgres`): each time psycopg sends something and
  waits for the server's answer. Outside pipeline mode every statement, COMMIT and
  `executemany` is one; inside a pipeline only a sync, a fetch that forces a flush, or the
  pipeline's end is one, however many statements it carries. BEGIN and COMMIT sent around a
  transaction's body (not inside it) are under `OUTSIDE_BODY`; a commit() or rollback() with no
  transaction open sends nothing and is not counted.

`counting_here()` also counts, in a RoundTrips of its own, only what the current context asks
(the task counting and the tasks it starts; a run's drive starts in a context of its own): the
store calls of one Telegram update, say, while other work goes on beside it.

Counting is in-process. For another process (a `loom-ops worker`), run the CLI through this file:
`python bench/roundtrips.py OUT -- worker ...` installs both counters, and every SIGUSR1 appends
one JSON snapshot line to OUT: the difference of two lines is the window between the signals.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

OUTSIDE_BODY = "(outside a transaction body: BEGIN, COMMIT)"
# Frames that only pass a store call along: the label is the first frame outside them.
_PLUMBING = (
    "agent/store/base.py",
    "agent/store/database.py",
    "agent/store/sqlite.py",
    "agent/store/postgres.py",
    "bench/roundtrips.py",
)
# psycopg's generators (psycopg 3.3) that, run inside a pipeline, wait for the server; every
# other one there only queues or sends. Outside a pipeline every generator is a round trip but
# the one that enters pipeline mode (local to the client).
_PIPELINE_ROUND_TRIPS = frozenset(
    {"BasePipeline._sync_gen", "BasePipeline._exit_gen", "BasePipeline._fetch_gen"}
)
_ENTER_PIPELINE = "BasePipeline._enter_gen"
# commit() and rollback() send nothing when no transaction is open: the pool's `with` block
# calls commit() on every connection it hands back.
_END_TRANSACTION = frozenset({"BaseConnection._commit_gen", "BaseConnection._rollback_gen"})

# The label of the transaction body running on this thread (None between bodies), and the
# `counting_here` counts of the context that asked for it (None when none counts).
_body = threading.local()
_here: ContextVar[RoundTrips | None] = ContextVar("loom_ops_round_trips_here", default=None)


@dataclass
class RoundTrips:
    """What one process asked of its store while counting; counters only ever grow."""

    calls: Counter[str] = field(default_factory=Counter)
    wire: Counter[str] = field(default_factory=Counter)

    @property
    def total_calls(self) -> int:
        """Store calls (transactions and reads) of every label."""
        return sum(self.calls.values())

    @property
    def total_wire(self) -> int:
        """PostgreSQL round trips of every label."""
        return sum(self.wire.values())

    def snapshot(self) -> RoundTrips:
        """A copy of the counts now (`dict(...)` copies in one step under the GIL)."""
        return RoundTrips(Counter(dict(self.calls)), Counter(dict(self.wire)))

    def since(self, earlier: RoundTrips) -> RoundTrips:
        """The counts made after `earlier` (a snapshot of the same counters)."""
        return RoundTrips(self.calls - earlier.calls, self.wire - earlier.wire)

    def lines(self, per: int, unit: str = "step", top: int = 8) -> list[str]:
        """Printable lines: the totals per `unit` (`per` of them), then the `top` labels."""
        out = [
            f"store calls {self.total_calls / per:6.2f}/{unit}, "
            f"PostgreSQL round trips {self.total_wire / per:6.2f}/{unit}"
        ]
        labels = sorted(
            set(self.calls) | set(self.wire),
            key=lambda label: (-self.wire[label], -self.calls[label], label),
        )
        for label in labels[:top]:
            out.append(
                f"  {self.calls[label] / per:6.2f} calls {self.wire[label] / per:6.2f} trips"
                f"  {label}"
            )
        if len(labels) > top:
            out.append(f"  ... and {len(labels) - top} more")
        return out

    def to_json(self) -> str:
        """One line of JSON (`from_json` reads it back)."""
        snap = self.snapshot()
        return json.dumps({"calls": snap.calls, "wire": snap.wire})

    @classmethod
    def from_json(cls, text: str) -> RoundTrips:
        """The counts `to_json` wrote."""
        data = json.loads(text)
        return cls(Counter(data["calls"]), Counter(data["wire"]))


def count_store(target: Any, counts: RoundTrips | None = None) -> RoundTrips:
    """Count every `transaction()` and `read()` of `target` in `counts` (returned; a new one
    if None). `target` is a Database instance (`service.store.db`) or an engine class
    (`SqliteDatabase`, `PostgresDatabase`: every instance, also those made later)."""
    counts = counts if counts is not None else RoundTrips()
    for name in ("transaction", "read"):
        setattr(target, name, _counted(getattr(target, name), counts, isinstance(target, type)))
    return counts


@contextlib.contextmanager
def counting_here() -> Iterator[RoundTrips]:
    """Until the block ends, count in the RoundTrips yielded the store calls asked for in this
    context and the tasks started in it, and the PostgreSQL round trips of their bodies (the
    BEGIN and COMMIT around a body are not in it); needs `count_store` (and `count_postgres`)
    installed."""
    counts = RoundTrips()
    token = _here.set(counts)
    try:
        yield counts
    finally:
        _here.reset(token)


def _counted(original: Callable[..., Any], counts: RoundTrips, unbound: bool) -> Any:
    """`original` (a Database's transaction or read), counting each call under its label and
    naming the body on its thread for `count_postgres`."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        at = 1 if unbound else 0  # (self, fn, ...) on a class, (fn, ...) on an instance
        label = _label(sys._getframe(1))
        counts.calls[label] += 1
        here = _here.get()
        if here is not None:
            here.calls[label] += 1
        fn = args[at]

        def body(conn: Any) -> Any:
            _body.label, _body.here = label, here
            try:
                return fn(conn)
            finally:
                _body.label = _body.here = None

        return await original(*args[:at], body, *args[at + 1 :], **kwargs)

    return call


def _label(frame: FrameType | None) -> str:
    """`module:qualname` of the first caller that is not store plumbing."""
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not path.endswith(_PLUMBING):
            return f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return "?"


def count_postgres(counts: RoundTrips) -> Callable[[], None]:
    """Count the network round trips of every (sync) psycopg connection of this process in
    `counts`, by the store call whose body made them; returns the function that stops it."""
    import psycopg  # only where PostgreSQL is measured

    original = psycopg.Connection.wait

    def wait(self: psycopg.Connection[Any], gen: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(gen, "__qualname__", "")
        pipeline = self._pipeline
        if name in _END_TRANSACTION:
            trip = self.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE
        elif self.pgconn.pipeline_status:
            trip = name in _PIPELINE_ROUND_TRIPS
        elif name == _ENTER_PIPELINE:
            # Entering a nested pipeline syncs the outer one when it has work queued.
            trip = pipeline is not None and pipeline.level > 0 and bool(pipeline.command_queue)
        else:
            trip = True
        if trip:
            label = getattr(_body, "label", None) or OUTSIDE_BODY
            counts.wire[label] += 1
            here = getattr(_body, "here", None)
            if here is not None:
                here.wire[label] += 1
        return original(self, gen, *args, **kwargs)

    psycopg.Connection.wait = wait  # type: ignore[method-assign]

    def undo() -> None:
        psycopg.Connection.wait = original  # type: ignore[method-assign]

    return undo


def _serve_counted(out: Path, argv: list[str]) -> int:
    """Run the CLI with `argv`, counting; each SIGUSR1 appends a snapshot line to `out`."""
    from agent.frontends.cli import main
    from agent.store.postgres import PostgresDatabase
    from agent.store.sqlite import SqliteDatabase

    counts = RoundTrips()
    count_store(SqliteDatabase, counts)
    count_store(PostgresDatabase, counts)
    count_postgres(counts)

    def snapshot(signum: int, frame: FrameType | None) -> None:
        with out.open("a") as handle:
            handle.write(counts.to_json() + "\n")

    signal.signal(signal.SIGUSR1, snapshot)
    return main(argv)


if __name__ == "__main__":
    # Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
    # standard library's `http` (httpx needs it): put the repo there instead.
    _bench = Path(__file__).resolve().parent
    sys.path[:] = [str(_bench.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _bench]
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit("usage: python bench/roundtrips.py OUT -- <loom-ops arguments>")
    sys.exit(_serve_counted(Path(sys.argv[1]), sys.argv[3:]))
