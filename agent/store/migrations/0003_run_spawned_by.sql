-- A child run remembers the parent's delegate call that started it, so the parent wakes when
-- every child of that call has ended.
ALTER TABLE runs ADD COLUMN spawned_by TEXT;
CREATE INDEX runs_by_spawner ON runs(spawned_by);
