-- Metrics the store keeps, so a /metrics scrape reads a few dozen rows however large the store
-- grows (agent/store/metrics.py says how each counter is kept). One row per counter and label
-- set; a histogram is one row per bucket (not cumulative) plus a `_sum` row.
CREATE TABLE metric_counters (
    name   TEXT NOT NULL,
    labels TEXT NOT NULL,                      -- canonical JSON object of the label values
    value  REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
-- How far the journal is folded into the counters: the last `events.seq` counted. There from
-- the start, so two first scrapes at once conflict on one row instead of both inserting it.
INSERT INTO metric_counters (name, labels, value) VALUES ('_journal_seq', '{}', 0);
-- Chat deliveries are not journaled: the outbox row's own update counts them, in the sender's
-- transaction (never on a run's step, which only inserts outbox rows).
INSERT INTO metric_counters (name, labels, value) VALUES
    ('outbox_delivered', '{}',
        (SELECT COUNT(*) FROM outbox WHERE delivered_at IS NOT NULL AND failed_at IS NULL)),
    ('outbox_delivery_failures', '{"outcome":"gave_up"}',
        (SELECT COUNT(*) FROM outbox WHERE failed_at IS NOT NULL)),
    ('outbox_delivery_failures', '{"outcome":"retry"}',
        (SELECT COALESCE(SUM(attempts), 0) - COUNT(failed_at) FROM outbox));
CREATE TRIGGER outbox_metrics_delivered AFTER UPDATE OF delivered_at ON outbox
WHEN OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL AND NEW.failed_at IS NULL
BEGIN
    INSERT INTO metric_counters (name, labels, value) VALUES ('outbox_delivered', '{}', 1)
        ON CONFLICT (name, labels) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER outbox_metrics_failed AFTER UPDATE OF attempts ON outbox
WHEN NEW.attempts > OLD.attempts
BEGIN
    INSERT INTO metric_counters (name, labels, value) VALUES (
        'outbox_delivery_failures',
        CASE WHEN NEW.failed_at IS NULL THEN '{"outcome":"retry"}' ELSE '{"outcome":"gave_up"}' END,
        NEW.attempts - OLD.attempts
    ) ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value;
END;
