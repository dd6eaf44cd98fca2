-- Per-person API tokens (`loom-ops tokens`): only a hash of each token is kept (a token is
-- 256 random bits, so a plain SHA-256 cannot be reversed or guessed), with the person the
-- people file names and the token's name, which decisions record as `api:<name>`. A revoked
-- token keeps its row: its name stays that person's identity in the journal and for four eyes.
CREATE TABLE api_tokens (
    name       TEXT PRIMARY KEY,
    person     TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
