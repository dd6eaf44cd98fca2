-- A run's pinned runbook and its params (often tens of KiB) live apart from the run's row,
-- which every step rewrites (its chain head, checkpoint and lease): a step's update no longer
-- copies the runbook, so a step costs the same in a 1,000-step runbook as in a 4-step one.
CREATE TABLE run_runbooks (
    run_id  TEXT PRIMARY KEY REFERENCES runs(id),
    runbook TEXT NOT NULL,
    params  TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO run_runbooks (run_id, runbook, params)
    SELECT id, runbook, params FROM runs WHERE runbook IS NOT NULL;
ALTER TABLE runs DROP COLUMN runbook;
ALTER TABLE runs DROP COLUMN params;
