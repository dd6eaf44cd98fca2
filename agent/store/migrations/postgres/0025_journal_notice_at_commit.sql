-- The journal announces its own appends: the commit that gives an event its seq also notifies
-- `loom_ops_journal` (JOURNAL_CHANNEL in agent/store/database.py) with the event's run id, so
-- SSE readers in other processes wake. PostgreSQL sends one notice per distinct run id and
-- transaction, after the commit; the client no longer sends a statement of its own for it.
CREATE OR REPLACE FUNCTION loom_ops_events_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(TG_TABLE_SCHEMA || '/loom-ops/journal', 0));
    UPDATE events SET seq = nextval('events_seq') WHERE id = NEW.id;
    PERFORM pg_notify('loom_ops_journal', NEW.run_id);
    RETURN NULL;
END;
$$;
