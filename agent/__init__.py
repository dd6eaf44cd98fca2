"""loom-ops: durable runbook runs, exactly once or a human decides."""
