-- The live processes that serve this store (serve, telegram, sandbox, worker), each with a
-- heartbeat: a CLI decision only records itself when one of them drives runs, and wakes it,
-- instead of taking the run from it; `loom-ops status` lists them.
CREATE TABLE processes (
    owner        TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    drives_runs  INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
