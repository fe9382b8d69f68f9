-- When the event a decision was made from was published (its envelope's occurred_at).  A folder-level
-- tracking rule's decision replaces an earlier one only for a newer event, so an old event handled
-- late (redelivered after a crash before the offset commit, finished by a replica that lost its
-- partition, replayed from the dead letters) never files a message back under a folder it has left.
ALTER TABLE email_decision ADD COLUMN event_at timestamptz;
-- The same order for an activity's regarding record as folder rules set it: the newest filing wins,
-- whichever mailbox it came from and whatever order the events were handled in.
ALTER TABLE email_activity ADD COLUMN regarding_at timestamptz;
