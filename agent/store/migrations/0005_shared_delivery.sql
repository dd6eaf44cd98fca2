-- Several bot instances share the outbox: a chat's messages are sent by the one instance that
-- holds the chat's lease, in order; a dead instance's lease expires and another takes over.
CREATE TABLE chat_leases (
    chat_id    INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
-- Updates already taken, by bot: after a polling leader dies, Telegram hands its standby the
-- updates the leader had not confirmed; after a webhook timeout it sends an update again.
CREATE TABLE telegram_updates (
    bot_id      INTEGER NOT NULL,
    update_id   INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (bot_id, update_id)
);
-- A run whose drive was interrupted (the LLM unreachable, say) waits this long before a
-- worker claims it again, instead of being retried in a tight loop.
ALTER TABLE runs ADD COLUMN not_before REAL;
