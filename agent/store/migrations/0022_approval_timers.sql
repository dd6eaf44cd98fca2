-- Reminders and escalation of unanswered requests: each pending request has up to three
-- timers (remind_at, escalate_at, deadline_at); a hop's *_at column is set once, by the one
-- transaction that makes it (UPDATE ... WHERE reminded_at IS NULL), so processes sweeping the
-- same store make each hop once. escalate_to (JSON list) become deciders at escalated_at;
-- on_expiry says what expiry does: stop, or roll back the completed steps (never consent).
ALTER TABLE approvals ADD COLUMN remind_at REAL;
ALTER TABLE approvals ADD COLUMN reminded_at REAL;
ALTER TABLE approvals ADD COLUMN escalate_at REAL;
ALTER TABLE approvals ADD COLUMN escalated_at REAL;
ALTER TABLE approvals ADD COLUMN escalate_to TEXT;
ALTER TABLE approvals ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'stop';
-- When a chat user first wrote to the bot in a private chat: only they get private reminders
-- (the Bot API refuses a message to someone who never started the bot).
ALTER TABLE chat_users ADD COLUMN private_chat_at REAL;
