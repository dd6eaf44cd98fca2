-- A Bot API that restarts its numbering (a fresh self-hosted server, the sandbox's stand-in,
-- Telegram itself after a week without updates) hands out update ids seen before: an update
-- is a duplicate only when its content is the same too, so the content's digest is kept.
ALTER TABLE telegram_updates ADD COLUMN digest TEXT;
