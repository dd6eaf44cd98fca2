"""What the store refuses: every error is a StoreError."""

from __future__ import annotations

from agent.store.database import StoreError


class RunNotFound(StoreError):
    """No run has that id."""


class RunExists(StoreError):
    """A run with that id exists already."""


class RunBusy(StoreError):
    """Another live process holds the run's lease."""


class RunNotRunnable(StoreError):
    """The run's status does not allow driving it now."""


class LeaseLost(StoreError):
    """This process no longer owns the run (cancelled, or taken over after a lease expiry)."""


class ApprovalNotFound(StoreError):
    """No approval request matches."""
