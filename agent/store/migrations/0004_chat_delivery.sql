-- Chat delivery: an outbox entry the sender gave up on (a permanent Bot API error) is kept for
-- the record but no longer retried; a failed attempt waits out its backoff before the next.
ALTER TABLE outbox ADD COLUMN failed_at REAL;
ALTER TABLE outbox ADD COLUMN next_attempt_at REAL NOT NULL DEFAULT 0;
-- A progress entry being sent: a change committed meanwhile needs an entry of its own.
ALTER TABLE outbox ADD COLUMN claimed_at REAL;
-- How many parts of a message sent in parts (a long summary) went out already.
ALTER TABLE outbox ADD COLUMN parts_sent INTEGER NOT NULL DEFAULT 0;
DROP INDEX outbox_undelivered;
CREATE INDEX outbox_undelivered ON outbox(id) WHERE delivered_at IS NULL AND failed_at IS NULL;
-- How a chat identity ("telegram:<user id>") is shown to people, e.g. "@alice".
CREATE TABLE chat_users (
    identity   TEXT PRIMARY KEY,
    display    TEXT NOT NULL,
    updated_at REAL NOT NULL
);
-- The runs a chat started, for /runs.
CREATE INDEX runs_by_chat ON runs(json_extract(origin, '$.chat_id'), created_at)
    WHERE parent_id IS NULL;
-- The sender finds a request's message (to edit it) and a run tree's progress message.
CREATE INDEX outbox_by_approval ON outbox(json_extract(payload, '$.approval_id'))
    WHERE kind = 'approval_request';
CREATE INDEX outbox_progress_by_root ON outbox(json_extract(payload, '$.root_id'), delivered_at)
    WHERE kind = 'progress';
