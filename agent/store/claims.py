"""Claims: leases that say which process drives a run, fenced by an epoch."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.errors import LeaseLost, RunBusy, RunNotFound, RunNotRunnable
from agent.events import Event, PolicyTurn, RunClaimed, RunInterrupted
from agent.records import Checkpoint, Claim, Effects, RunRecord, RunStatus
from agent.store.base import StoreBase
from agent.store.commands import Outcome
from agent.store.database import Connection
from agent.store.drive import Drive
from agent.store.rows import SELECT_RUNS, run_from_row


class ClaimsStore(StoreBase):
    """Who drives which run, until when."""

    async def claim_run(
        self,
        run_id: str,
        owner: str,
        ttl: float,
        owner_is_dead: Callable[[str], bool],
    ) -> Drive:
        """Take the lease of a runnable run at the next epoch and mark it running; returns the
        handle every write of the drive goes through.

        A queued run is free; a running run is free when its lease expired or its owner is known
        dead. Anything else raises RunBusy, RunNotRunnable or RunNotFound.
        """
        now = time.time()

        def claim(conn: Connection) -> RunRecord:
            row = conn.execute(
                "SELECT status, lease_owner, lease_expires_at, lease_epoch FROM runs WHERE id = ?"
                + self.dialect.for_update,
                (run_id,),
            ).fetchone()
            if row is None:
                raise RunNotFound(f"unknown run id {run_id!r}")
            status, holder = RunStatus(row["status"]), row["lease_owner"]
            expires, epoch = row["lease_expires_at"], row["lease_epoch"]
            takeover = None
            if status == RunStatus.RUNNING:
                if holder == owner:
                    pass
                elif holder is None or (expires or 0) < now or owner_is_dead(holder):
                    takeover = holder
                else:
                    raise RunBusy(
                        f"run {run_id} is being driven by {holder} (lease until "
                        f"{time.strftime('%H:%M:%S', time.gmtime(expires or 0))} UTC)"
                    )
            elif status != RunStatus.QUEUED:
                raise RunNotRunnable(f"run {run_id} is {status}, not runnable")
            self._take_lease(conn, run_id, owner, epoch + 1, now, ttl, takeover)
            return run_from_row(conn.execute(f"{SELECT_RUNS} WHERE id = ?", (run_id,)).fetchone())

        run = await self._transaction(claim)
        self._claimed_runs.pop(run_id, None)  # a batch's claim of it is stale now
        return Drive(self, Claim.of(run), run)  # type: ignore[arg-type]

    async def drive(self, claim: Claim) -> Drive:
        """The handle of a claim this process took earlier (a worker's batch), once the run is
        still under it; LeaseLost if it was claimed again since.

        The run is the row the batch's claim read while that claim's lease has not expired
        and this process has not claimed the run again: nobody else can have taken it then.
        Otherwise it is read anew (a write would be refused anyway, but only after the drive
        asked its policy for a turn)."""
        run = self._claimed_runs.pop(claim.run_id, None)
        if run is None or Claim.of(run) != claim or (run.lease_expires_at or 0) <= time.time():
            run = await self.get_run(claim.run_id)
        if run.lease_owner is None or Claim.of(run) != claim:
            self._forget_head(claim)
            raise LeaseLost(f"run {claim.run_id} was claimed again since this process took it")
        return Drive(self, claim, run)  # type: ignore[arg-type]

    def _take_lease(
        self,
        conn: Connection,
        run_id: str,
        owner: str,
        epoch: int,
        now: float,
        ttl: float,
        taken_from: str | None,
    ) -> Claim:
        """In a claiming transaction: mark the run running under `owner`'s lease at `epoch`;
        the run head it leaves is kept for the claim's first write (see `_fence`)."""
        expires = now + ttl
        self._append_events(
            conn,
            run_id,
            [RunClaimed(owner, epoch, taken_from)],
            now,
            {
                "status": RunStatus.RUNNING,
                "lease_owner": owner,
                "lease_epoch": epoch,
                "lease_expires_at": expires,
                "not_before": None,
            },
        )
        head = self._head(conn, run_id)
        head.status, head.lease_owner, head.lease_epoch = RunStatus.RUNNING, owner, epoch
        head.lease_expires_at = expires
        claim = Claim(run_id, owner, epoch)
        self._queued.keep.append(claim)
        return claim

    async def claim_runnable(
        self, owner: str, ttl: float, limit: int, effects: Effects, dead: Sequence[str] = ()
    ) -> list[Claim]:
        """Claim up to `limit` runs nobody drives (queued, or running with an expired lease
        or under an owner in `dead`, processes proven gone) that a process with `effects`
        may act, oldest first, and mark them running under `owner`'s lease: what a worker
        takes.

        Rows another transaction holds are skipped (PostgreSQL's SKIP LOCKED), so workers
        claiming at once take different runs instead of queueing behind each other.
        """
        now = time.time()
        gone = f" OR lease_owner IN ({', '.join('?' for _ in dead)})" if dead else ""

        def claim(conn: Connection) -> list[tuple[Claim, RunRecord]]:
            rows = conn.execute(
                "SELECT id, status, lease_owner, lease_epoch FROM runs "
                "WHERE ((status = 'queued' AND (not_before IS NULL OR not_before <= ?)) "
                "OR (status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < ?"
                f"{gone}))){self._acted_within(effects)} "
                f"ORDER BY created_at, id LIMIT ?{self.dialect.skip_locked}",
                (now, now, *dead, limit),
            ).fetchall()
            claims = []
            for row in rows:
                taken_from = row["lease_owner"] if row["status"] == RunStatus.RUNNING else None
                claims.append(
                    self._take_lease(
                        conn, row["id"], owner, row["lease_epoch"] + 1, now, ttl, taken_from
                    )
                )
            if not claims:
                return []
            marks = ", ".join("?" for _ in claims)
            claimed = conn.execute(
                f"{SELECT_RUNS} WHERE id IN ({marks})", [c.run_id for c in claims]
            ).fetchall()
            runs = {run.id: run for run in map(run_from_row, claimed)}
            return [(c, runs[c.run_id]) for c in claims]

        if limit < 1:
            return []
        taken = await self._transaction(claim)
        self._claimed_runs.update((c.run_id, run) for c, run in taken)
        return [c for c, _ in taken]

    async def _renew(self, claim: Claim, ttl: float) -> bool:
        """Extend the lease; False when this claim lost it."""

        def renew(conn: Connection) -> bool:
            cursor = conn.execute(
                "UPDATE runs SET lease_expires_at = ? WHERE id = ? AND lease_owner = ? "
                "AND lease_epoch = ? AND status = 'running'",
                (time.time() + ttl, claim.run_id, claim.owner, claim.epoch),
            )
            return cursor.rowcount == 1

        return await self._transaction(renew)

    async def _release(
        self,
        claim: Claim,
        retry_after: float | None = None,
        earlier: Outcome | None = None,
        unacted: tuple[PolicyTurn, Checkpoint] | None = None,
    ) -> bool:
        """Give the lease back, leaving a running run queued for whoever comes next (workers
        wait `retry_after` seconds before they claim it; an explicit resume does not). The
        drive's held outcome (`earlier`), then a policy turn none of whose calls began (with
        the checkpoint that points at it: `unacted`), are written first, while the claim
        still holds. False when that write found the claim lost (cancelled, taken over):
        nothing was written. With nothing to write, a lost claim changes no row: True."""
        not_before = time.time() + retry_after if retry_after is not None else None
        self._forget_head(claim)  # the run's row is no drive's to keep now

        def release(conn: Connection) -> None:
            if earlier is not None or unacted is not None:
                self._fence(conn, claim, earlier)  # LeaseLost: nothing is ours to write
            if unacted is not None:
                turn, checkpoint = unacted
                self._append_events(
                    conn, claim.run_id, [turn], time.time(), {"checkpoint": checkpoint.to_json()}
                )
            conn.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, not_before = ?, "
                "status = CASE status WHEN 'running' THEN 'queued' ELSE status END "
                "WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
                (not_before, claim.run_id, claim.owner, claim.epoch),
            )
            self._announce_runnable(conn)

        try:
            await self._transaction(release)
        except LeaseLost:  # another process holds the run now; its journal is not ours
            return False
        return True

    async def lease_owners(self) -> list[str]:
        """The owners whose leases of running runs have not run out: the processes that drive
        runs now, unless one of them died since its last renewal."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT DISTINCT lease_owner FROM runs WHERE status = 'running' "
                "AND lease_expires_at >= ?",
                (time.time(),),
            ).fetchall()
        )
        return [row["lease_owner"] for row in rows if row["lease_owner"]]

    async def runnable_run_ids(
        self,
        owner_is_dead: Callable[[str], bool],
        due_only: bool = False,
        effects: Effects | None = None,
    ) -> list[str]:
        """Runs a process may pick up: queued ones, and running ones whose owner is gone.
        `due_only` leaves out queued runs asked to wait (`not_before`, after an outage);
        `effects` leaves out runs a process with them may not act (None: none is left out)."""
        now = time.time()
        within = self._acted_within(effects) if effects is not None else ""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, status, lease_owner, lease_expires_at, not_before FROM runs "
                f"WHERE status IN ('queued', 'running'){within} ORDER BY created_at"
            ).fetchall()
        )
        picked = []
        for run_id, status, holder, expires, not_before in rows:
            if status == RunStatus.QUEUED and due_only and (not_before or 0) > now:
                continue
            if status == RunStatus.QUEUED or (
                holder is None or (expires or 0) < now or owner_is_dead(holder)
            ):
                picked.append(run_id)
        return picked

    def _acted_within(self, effects: Effects) -> str:
        """SQL that leaves out the runs acting live in a way a process with `effects` may
        not (`Effects.lacking`); a run from before effects were recorded (NULL) is kept."""
        lacking = effects.lacking(Effects(shell=True, mcp=True, checks=True))
        if not lacking:
            return ""
        live = " OR ".join(self.dialect.json_true("effects", kind) for kind in lacking)
        return f" AND (effects IS NULL OR NOT ({live}))"

    async def _interrupt(
        self,
        claim: Claim,
        reason: str,
        retry_after: float,
        earlier: Outcome | None = None,
        unacted: tuple[PolicyTurn, Checkpoint] | None = None,
    ) -> bool:
        """Journal why a drive stopped (after a policy turn none of whose calls began, with
        the checkpoint that points at it: `unacted`) and hand the run back, queued for
        whoever claims it after `retry_after` seconds; fenced, so a driver that lost its
        lease writes nothing (False)."""
        now = time.time()

        def interrupt(conn: Connection) -> bool:
            try:
                self._fence(conn, claim, earlier)
            except LeaseLost:
                return False
            updates: dict[str, object] = {
                "status": RunStatus.QUEUED,
                "lease_owner": None,
                "lease_expires_at": None,
                "not_before": now + retry_after,
            }
            events: list[Event] = [RunInterrupted(reason)]
            if unacted is not None:
                events.insert(0, unacted[0])
                updates["checkpoint"] = unacted[1].to_json()
            self._append_events(conn, claim.run_id, events, now, updates)
            return True

        return await self._transaction(interrupt)
