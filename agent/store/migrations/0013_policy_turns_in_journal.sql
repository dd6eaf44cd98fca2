-- A policy's answer is stored once: in the run's journal, as its `policy_turn` event, which
-- the hash chain covers. `llm_calls` held the same answer a second time. Every `llm_calls`
-- row was written in the transaction that appended its event, so nothing is lost with it.
-- The journal keeps the rule the table's key kept: one answer per turn of a run.
CREATE UNIQUE INDEX events_one_policy_turn
    ON events(run_id, json_extract(data, '$.turn')) WHERE type = 'policy_turn';
-- The token totals a metrics scrape sums, kept per run (moved with each policy turn).
ALTER TABLE runs ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET
    prompt_tokens = (SELECT COALESCE(SUM(prompt_tokens), 0) FROM llm_calls WHERE run_id = runs.id),
    completion_tokens =
        (SELECT COALESCE(SUM(completion_tokens), 0) FROM llm_calls WHERE run_id = runs.id);
DROP TABLE llm_calls;
