-- Runs, the hash-chained event journal, tool calls, policy (LLM) turns, approvals, outbox.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    parent_id        TEXT REFERENCES runs(id),
    role             TEXT NOT NULL,
    status           TEXT NOT NULL,
    request          TEXT NOT NULL,
    requested_by     TEXT NOT NULL,
    origin           TEXT NOT NULL,            -- JSON: {"kind": "cli"|"http"|"telegram", "chat_id", "thread_id"}
    runbook_id       TEXT,
    runbook          TEXT,                     -- JSON snapshot of the pinned runbook
    params           TEXT NOT NULL DEFAULT '{}',
    checkpoint       TEXT NOT NULL,            -- JSON: where the loop stands
    limits           TEXT NOT NULL,            -- JSON: budgets fixed at start
    summary          TEXT,
    error            TEXT,
    lease_owner      TEXT,
    lease_expires_at REAL,
    event_count      INTEGER NOT NULL DEFAULT 0,  -- length of this run's hash chain
    last_hash        TEXT NOT NULL DEFAULT '',    -- head of this run's hash chain
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    finished_at      REAL
);
CREATE INDEX runs_by_status ON runs(status, created_at);
CREATE INDEX runs_by_parent ON runs(parent_id);

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY,            -- never reused: rows are never deleted (trigger)
    run_id    TEXT NOT NULL REFERENCES runs(id),
    idx       INTEGER NOT NULL,                -- position in the run's chain, from 1
    ts        REAL NOT NULL,
    type      TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    UNIQUE (run_id, idx)
);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

CREATE TABLE tool_calls (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id),
    call_key    TEXT NOT NULL UNIQUE,          -- idempotency key: <run_id>#<turn>.<position>
    turn        INTEGER NOT NULL,
    position    INTEGER NOT NULL,
    tool        TEXT NOT NULL,
    args        TEXT NOT NULL,
    step_id     TEXT,
    attempt     INTEGER NOT NULL DEFAULT 1,
    status      TEXT NOT NULL,                 -- intent | retry | ok | error | refused | skipped
    outcome     TEXT,
    intent_at   REAL NOT NULL,
    outcome_at  REAL,
    duration_ms REAL
);
CREATE INDEX tool_calls_by_run ON tool_calls(run_id, turn, position);

CREATE TABLE llm_calls (
    id                INTEGER PRIMARY KEY,
    run_id            TEXT NOT NULL REFERENCES runs(id),
    turn              INTEGER NOT NULL,
    policy            TEXT NOT NULL,
    request_hash      TEXT NOT NULL,
    response          TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    UNIQUE (run_id, turn)
);

CREATE TABLE approvals (
    id           INTEGER PRIMARY KEY,
    token        TEXT NOT NULL UNIQUE,         -- opaque, for buttons and links
    run_id       TEXT NOT NULL REFERENCES runs(id),
    call_key     TEXT NOT NULL,
    kind         TEXT NOT NULL,                -- gate | in_doubt
    step_id      TEXT,
    action       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    rollback     TEXT,
    deciders     TEXT NOT NULL,                -- JSON list of identities; empty: anyone
    four_eyes    INTEGER NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL,
    status       TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   REAL,
    note         TEXT,
    created_at   REAL NOT NULL,
    deadline_at  REAL NOT NULL
);
CREATE INDEX approvals_by_run ON approvals(run_id);
CREATE INDEX approvals_pending_by_deadline ON approvals(status, deadline_at);
CREATE UNIQUE INDEX approvals_one_pending_per_run ON approvals(run_id) WHERE status = 'pending';

CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY,
    run_id       TEXT REFERENCES runs(id),
    target       TEXT NOT NULL,                -- JSON: {"chat_id", "thread_id"}
    kind         TEXT NOT NULL,                -- approval_request | approval_decided | run_finished | ...
    payload      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    delivered_at REAL,
    message_id   INTEGER
);
CREATE INDEX outbox_undelivered ON outbox(id) WHERE delivered_at IS NULL;
