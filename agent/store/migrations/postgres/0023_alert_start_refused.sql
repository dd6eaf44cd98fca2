-- Why an alert incident's `auto` start was refused (its starters, its request, the active-run
-- cap): the incident is then left proposed, and its card offers Start to a person.
ALTER TABLE alert_incidents ADD COLUMN start_refused TEXT;
-- A redelivered notification is known by its digest across all incidents of its group (a late
-- redelivery of an old resolve must not resolve the group's newer incident).
CREATE INDEX alert_notifications_by_digest ON alert_notifications(digest);
