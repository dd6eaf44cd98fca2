-- A keyed audit trail (issue 17): each event records the id of the audit key its link is an
-- HMAC under (NULL: a plain SHA-256, as every earlier event is), and each run a global number
-- from a one-row counter moved in the transaction that writes the run's first event, so a
-- deleted run shows as a gap (a rolled-back creation leaves none). Existing runs are numbered
-- in creation order; `key_id` on a run is the key of its last event, for its published head.
ALTER TABLE events ADD COLUMN key_id TEXT;
ALTER TABLE runs ADD COLUMN run_no INTEGER;
ALTER TABLE runs ADD COLUMN key_id TEXT;
UPDATE runs SET run_no = numbered.n
FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY created_at, id) AS n FROM runs) AS numbered
WHERE numbered.id = runs.id;
CREATE UNIQUE INDEX runs_run_no ON runs (run_no);
CREATE TABLE run_counter (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    last_run_no INTEGER NOT NULL
);
INSERT INTO run_counter (id, last_run_no) SELECT 1, COALESCE(MAX(run_no), 0) FROM runs;
