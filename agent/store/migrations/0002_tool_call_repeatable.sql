-- Whether a call was safe to repeat, judged when its intent was committed (a resume must not
-- judge it by settings that changed since, e.g. LOOM_OPS_ALLOW_SHELL). Old rows: not safe.
ALTER TABLE tool_calls ADD COLUMN repeatable INTEGER NOT NULL DEFAULT 0;
