-- A statement that must change an exact number of rows says so in itself
-- (`WITH changed AS (... RETURNING 1) SELECT loom_ops_expect(...)`, see PostgresDatabase.expect):
-- a wrong count fails the transaction on the server, so the check costs no round trip of its
-- own. The message is the token the transaction gave the check, to raise its own error.
CREATE FUNCTION loom_ops_expect(got BIGINT, wanted BIGINT, token TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    IF got <> wanted THEN
        RAISE EXCEPTION USING ERRCODE = 'LO001', MESSAGE = token;
    END IF;
END
$$;
