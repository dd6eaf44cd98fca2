-- Each claim of a run's lease takes the next epoch. A drive writes (and starts side effects)
-- only while the run's lease is still its owner's at its epoch, so a driver that lost its lease,
-- even to a later claim by the same process, writes and starts nothing.
ALTER TABLE runs ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
-- Where an attempt of a call may act (host, boot, PID namespace, its processes' marker, the
-- time after which it can no longer act), so a resume can find it again before putting the
-- call in doubt.
ALTER TABLE tool_calls ADD COLUMN attempt_info TEXT;
