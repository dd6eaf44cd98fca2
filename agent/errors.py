"""Every error loom-ops raises on purpose: one base, `LoomOpsError`, and the kind of refusal.

Invariants: `str(error)` is one line for a human, written once where the error is raised; a
front end maps `error.kind` to what it answers (an exit code, an HTTP status, a chat reply) and
never rewrites that text. What a front end may phrase its own way travels as structured fields
(a param's name, a runbook's file and line, the numbers of the open approval requests).

This is the bottom layer: it imports nothing from `agent`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path


class ErrorKind(StrEnum):
    """What went wrong, in the terms a front end answers in."""

    INVALID = "invalid"  # the input is wrong: a request, a param, a file, a setting
    NOT_FOUND = "not_found"  # no run or approval request has that id or number
    CONFLICT = "conflict"  # the state forbids it now: exists, decided, ended, driven elsewhere
    FORBIDDEN = "forbidden"  # this person or command may not: not an approver, not allowlisted
    UNAVAILABLE = "unavailable"  # what it needs is away (database, LLM, MCP server): retry later
    BUSY = "busy"  # too much is going on now (active runs, a person's rate): retry shortly


class LoomOpsError(Exception):
    """The base of every loom-ops error; `kind` is the class's, unless the raiser names one."""

    kind: ErrorKind = ErrorKind.INVALID

    def __init__(self, message: str = "", *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


def kind_of(error: BaseException) -> ErrorKind | None:
    """The kind of any error: a LoomOpsError's own; UNAVAILABLE for the machine's (an OSError,
    a database driver's error: the disk, the network or the database broke, not the input);
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(error, LoomOpsError):
        return error.kind
    if isinstance(error, (OSError, *_driver_errors())):
        return ErrorKind.UNAVAILABLE
    return None


def _driver_errors() -> tuple[type[BaseException], ...]:
    # Only a driver that is loaded can have raised: looking it up imports nothing.
    drivers = (sys.modules.get("sqlite3"), sys.modules.get("psycopg"))
    return tuple(driver.Error for driver in drivers if driver is not None)


# -- runbooks and requests ----------------------------------------------------------------------


class ParamError(LoomOpsError, ValueError):
    """A parameter value given by a user was refused; the message is one line naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RunbookError(LoomOpsError, ValueError):
    """A runbook file is invalid: where (path, line, field) and why (message)."""

    def __init__(self, path: Path, line: int | None, field: str, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PeopleFileError(RunbookError):
    """The people file is invalid: where (path, line, field) and why, as for a runbook."""


class RequestError(LoomOpsError, ValueError):
    """A request that cannot be understood; `str()` is one line for a human."""


class RenderError(LoomOpsError, ValueError):
    """A template could not be rendered into a command, text or URL."""


class RenderLimitError(RenderError):
    """A render went past one of its bounds; the message names the bound it hit (time and
    size, numbers, hash collisions, source length)."""

    def __init__(self, bound: str, detail: str) -> None:
        super().__init__(f"template exceeded the render limit ({bound}): {detail}")
        self.bound = bound
        self.detail = detail


# -- the store ----------------------------------------------------------------------------------


class StoreError(LoomOpsError):
    """A store operation that cannot be done; `str()` is one line for a human."""


class StoreUnavailable(StoreError):
    """The database does not answer (down, unreachable, locked out); trying later may work."""

    kind = ErrorKind.UNAVAILABLE


class SchemaTooNew(StoreError):
    """The database was written by a newer loom-ops than this one."""

    kind = ErrorKind.CONFLICT


class RunNotFound(StoreError):
    """No run has that id."""

    kind = ErrorKind.NOT_FOUND


class RunExists(StoreError):
    """A run with that id exists already."""

    kind = ErrorKind.CONFLICT


class RunBusy(StoreError):
    """Another live process holds the run's lease."""

    kind = ErrorKind.CONFLICT


class RunNotRunnable(StoreError):
    """The run's status does not allow driving it now."""

    kind = ErrorKind.CONFLICT


class LeaseLost(StoreError):
    """This process no longer owns the run (cancelled, or taken over after a lease expiry)."""

    kind = ErrorKind.CONFLICT


class CallNotInFlight(StoreError):
    """An outcome for a call attempt the store does not hold in flight (recorded already by a
    commit whose answer was lost, or never begun): it is not written again."""

    kind = ErrorKind.CONFLICT


class ApprovalNotFound(StoreError):
    """No approval request matches."""

    kind = ErrorKind.NOT_FOUND


class TokenExists(StoreError):
    """An API token of that name exists already (revoked ones too: a name is an identity)."""

    kind = ErrorKind.CONFLICT


class TokenNotFound(StoreError):
    """No API token has that name."""

    kind = ErrorKind.NOT_FOUND


class TooManyRuns(LoomOpsError):
    """No run may start now: LOOM_OPS_MAX_ACTIVE_RUNS incidents are active (counted when
    the run would be created)."""

    kind = ErrorKind.BUSY


# -- tools --------------------------------------------------------------------------------------


class AllowlistError(LoomOpsError, ValueError):
    """The allowlist file cannot be read or is invalid; str() names the file and the reason."""


class CommandDenied(LoomOpsError):
    """argv is not admitted; str() is a one-line reason naming the argv."""

    kind = ErrorKind.FORBIDDEN


class SpawnRefused(LoomOpsError):
    """The spawn gate had closed (its `spawn_before` instant passed): nothing was started."""

    kind = ErrorKind.CONFLICT


class McpError(LoomOpsError):
    """An MCP tool could not be called; `str()` is one line for the journal and the policy."""

    kind = ErrorKind.UNAVAILABLE


# -- policies -----------------------------------------------------------------------------------


class PolicyUnavailable(LoomOpsError):
    """No policy can serve the run now (none configured, or the LLM is down); it stays resumable."""

    kind = ErrorKind.UNAVAILABLE


class PolicyMisconfigured(LoomOpsError):
    """The LLM refused a setting (key, URL or model): the run cannot go on until a person fixes
    a setting, so it fails at once; the message is one line naming that setting."""


# -- runs and decisions -------------------------------------------------------------------------


class DecisionRefused(LoomOpsError):
    """The decider may not make this decision; `str()` says why in one line."""

    kind = ErrorKind.FORBIDDEN


class ServiceError(LoomOpsError):
    """A request the service refuses; `str()` is one line for a human, `kind` says why."""


class DeciderRefused(ServiceError):
    """This decider may not decide this request (not an approver, or four eyes)."""

    kind = ErrorKind.FORBIDDEN


class ApprovalAmbiguous(ServiceError):
    """A decision names no request, and the run has had several: `open_numbers` are the
    numbers of those still open (what a front end offers to decide)."""

    kind = ErrorKind.CONFLICT

    def __init__(self, message: str, open_numbers: Sequence[int]) -> None:
        super().__init__(message)
        self.open_numbers = tuple(open_numbers)


# -- serving ------------------------------------------------------------------------------------


class ServingRefused(LoomOpsError, ValueError):
    """A configuration the process will not start with; `str()` is one line for a human."""
