-- Chat delivery: an outbox entry the sender gave up on (a permanent Bot API error) is kept for
-- the record but no longer retried; a failed attempt waits out its backoff before the next.
ALTER TABLE outbox ADD COLUMN failed_at REAL;
ALTER TABLE outbox ADD COLUMN next_attempt_at REAL NOT NULL DEFAULT 0;
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
