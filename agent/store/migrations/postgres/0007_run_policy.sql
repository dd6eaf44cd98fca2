-- What drives a run (`mock`, or `openai:<model>`), chosen when it starts and kept on resume,
-- decisions and takeover: a run started with the mock never asks an LLM, and the reverse.
ALTER TABLE runs ADD COLUMN policy TEXT;
