-- What each live process may act live (commands, MCP tools, health checks), as its settings
-- say: a process claims only runs it may act to their end, and a command leaves a run it
-- starts or decides to a live process only when that process may act it. NULL: a process of
-- an older version, which says nothing and is taken to act everything, as it would try to.
ALTER TABLE processes ADD COLUMN effects TEXT;
