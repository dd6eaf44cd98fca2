-- Which effects a run acts on the world with (live commands, MCP tools, health checks), chosen
-- when it starts from the starting process's settings and kept by every process that drives
-- it: a dry-run run never turns live because a process with LOOM_OPS_ALLOW_SHELL=1 approved
-- or resumed it, and a live run never finishes quietly as a dry run elsewhere.
ALTER TABLE runs ADD COLUMN effects TEXT;
