-- What a person needs to decide a request: its number within its incident (#1, #2: what people
-- type), whether the action runs LIVE or as a dry-run, where it runs, and the evidence (the
-- last lines of the steps already run).
ALTER TABLE approvals ADD COLUMN number INTEGER;
ALTER TABLE approvals ADD COLUMN mode TEXT;
ALTER TABLE approvals ADD COLUMN runs_on TEXT;
ALTER TABLE approvals ADD COLUMN evidence TEXT;
