-- The bot's inbox: each Telegram update is stored here, in one durable commit with the rest of
-- its batch, before Telegram is told it was received (the next getUpdates offset, or a webhook's
-- 200), and is handled from here, so a crash between the two loses nothing. An update is known
-- by its id and a digest of its content: a redelivery repeats both and is not stored again,
-- while a Bot API that numbers its updates from 1 again reuses ids with other content.
-- `claimed_until`: an instance handles the row until then (another takes it over after);
-- `handled_at`: its handlers are done. Handled rows are pruned after two days.
CREATE TABLE telegram_inbox (
    id            INTEGER PRIMARY KEY,
    bot_id        INTEGER NOT NULL,
    update_id     INTEGER NOT NULL,
    digest        TEXT NOT NULL,
    payload       TEXT NOT NULL,                -- the update's JSON
    received_at   REAL NOT NULL,
    claimed_by    TEXT,
    claimed_until REAL,
    handled_at    REAL,
    UNIQUE (bot_id, update_id, digest)
);
CREATE INDEX telegram_inbox_pending ON telegram_inbox(bot_id, id) WHERE handled_at IS NULL;
CREATE INDEX telegram_inbox_handled ON telegram_inbox(handled_at) WHERE handled_at IS NOT NULL;
-- The ids the first-sight table remembers were handled: kept as handled rows, so a redelivery
-- of one after the upgrade is still skipped (a row without a digest proves nothing: dropped).
INSERT INTO telegram_inbox (bot_id, update_id, digest, payload, received_at, handled_at)
    SELECT bot_id, update_id, digest, '{}', received_at, received_at
    FROM telegram_updates WHERE digest IS NOT NULL;
DROP TABLE telegram_updates;
