-- A policy's answer is stored once: in the run's journal, as its `policy_turn` event, which
-- the hash chain covers. `llm_calls` held the same answer a second time. Every `llm_calls`
-- row was written in the transaction that appended its event, so nothing is lost with it.
-- The journal keeps the rule the table's key kept: one answer per turn of a run.
CREATE UNIQUE INDEX events_one_policy_turn
    ON events(run_id, json_extract(data, '$.turn')) WHERE type = 'policy_turn';
DROP TABLE llm_calls;
