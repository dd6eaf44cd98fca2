-- A call's arguments and outcome are stored once: in the run's journal, as its `tool_intent`
-- and `tool_outcome` events, which the hash chain covers. `tool_calls` held them a second
-- time; it now keeps where they are (the chain positions of the call's last intent and last
-- outcome) beside the facts only it holds (status, attempt, times). Every row's arguments
-- were written in the transaction that appended its intent event, and every outcome with its
-- outcome event (`audit verify` checks both), so nothing is lost with the two columns.
ALTER TABLE tool_calls ADD COLUMN intent_idx INTEGER;
ALTER TABLE tool_calls ADD COLUMN outcome_idx INTEGER;
-- One pass over the journal: each call's last intent and last outcome. A row without an
-- outcome (never decided) keeps none, as before.
UPDATE tool_calls SET intent_idx = found.intent_idx,
    outcome_idx = CASE WHEN tool_calls.outcome IS NOT NULL THEN found.outcome_idx END
FROM (
    SELECT run_id, json_extract(data, '$.call_key') AS call_key,
        MAX(CASE WHEN type = 'tool_intent' THEN idx END) AS intent_idx,
        MAX(CASE WHEN type = 'tool_outcome' THEN idx END) AS outcome_idx
    FROM events WHERE type IN ('tool_intent', 'tool_outcome') GROUP BY run_id, call_key
) AS found
WHERE found.run_id = tool_calls.run_id AND found.call_key = tool_calls.call_key;
ALTER TABLE tool_calls DROP COLUMN args;
ALTER TABLE tool_calls DROP COLUMN outcome;
