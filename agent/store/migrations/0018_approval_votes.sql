-- Approval by several people: a request needs `required` approvals by distinct people (1, as
-- before, unless the step's `approval:` rule says more). Each person's decision is one row of
-- approval_votes, keyed by the person (the people file's name, or the identity nobody mapped),
-- so two taps by one person, or their chat and CLI identities, can never count twice.
ALTER TABLE approvals ADD COLUMN required INTEGER NOT NULL DEFAULT 1;
CREATE TABLE approval_votes (
    approval_id INTEGER NOT NULL REFERENCES approvals(id),
    person      TEXT NOT NULL,
    decided_by  TEXT NOT NULL,
    decision    TEXT NOT NULL,
    note        TEXT,
    decided_at  REAL NOT NULL,
    PRIMARY KEY (approval_id, person)
);
