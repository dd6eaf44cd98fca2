-- Each person's recent /run messages in chat, for the per-person rate (TELEGRAM_RUN_RATE):
-- kept in the store, so a restart or a second bot instance does not reset the count. One row
-- per person, so two messages at once are serialized on it: `admitted_at` holds which of
-- the person's /run messages were admitted last and when (a JSON list of [chat:message, time],
-- at most the rate's length; a message handled again after a crash is not counted twice),
-- `answered_at`
-- when the bot answered a refusal since the last admitted one (one per flood), `ignored` the
-- /run messages it let pass in silence since then.
CREATE TABLE chat_run_rates (
    identity    TEXT PRIMARY KEY,
    admitted_at TEXT NOT NULL,
    answered_at DOUBLE PRECISION,
    ignored     INTEGER NOT NULL DEFAULT 0
);
