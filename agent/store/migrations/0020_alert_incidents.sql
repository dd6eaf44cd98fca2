-- Alert intake (POST /alerts/...): one incident per alert group while it is open. `open_key`
-- is the group's key while the incident is open and NULL once it is closed: its uniqueness
-- is what keeps two deliveries of one new group at once from opening two incidents (and
-- starting two runs). `run_id` is fixed when the incident opens (the run may be created a
-- moment later, or on a person's tap); `state` is proposed, started or ignored.
CREATE TABLE alert_incidents (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    source          TEXT NOT NULL,
    group_key       TEXT NOT NULL,
    open_key        TEXT UNIQUE,
    alertname       TEXT NOT NULL,
    labels          TEXT NOT NULL,
    annotations     TEXT NOT NULL,
    matchers        TEXT NOT NULL,
    runbook_id      TEXT NOT NULL,
    params          TEXT NOT NULL,
    start_mode      TEXT NOT NULL,
    state           TEXT NOT NULL,
    status          TEXT NOT NULL,
    firing          INTEGER NOT NULL,
    notifications   INTEGER NOT NULL,
    run_id          TEXT NOT NULL,
    chat_id         INTEGER,
    card_message_id INTEGER,
    first_at        REAL NOT NULL,
    last_at         REAL NOT NULL,
    resolved_at     REAL,
    decided_by      TEXT,
    decided_at      REAL,
    silence_id      TEXT,
    silenced_by     TEXT,
    silenced_until  REAL,
    closed_at       REAL
);
CREATE INDEX alert_incidents_by_group ON alert_incidents(group_key, id);
CREATE INDEX alert_incidents_by_run ON alert_incidents(run_id);
-- Every distinct notification an incident received, by a digest of its content: a
-- redelivered webhook (the same content) finds its row and changes nothing.
CREATE TABLE alert_notifications (
    incident_id INTEGER NOT NULL REFERENCES alert_incidents(id),
    digest      TEXT NOT NULL,
    status      TEXT NOT NULL,
    firing      INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (incident_id, digest)
);
