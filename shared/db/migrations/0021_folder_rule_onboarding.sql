-- Onboarding of a folder-level tracking rule: the mail ingest had read from a folder before a rule
-- mapped it is filed under the rule's record too, once.  At its next sync of the folder, ingest asks
-- the server which of those messages are still there (so mail deleted or moved out since, which a
-- server without QRESYNC never reported, is not filed) and announces those again on
-- `email.received` ("refiled"); here it records how far it has come, in the transaction that records
-- the progress the announcements stand for (services/ingest/imap_sync.py: ``_onboard``).
--
-- onboarded_at NULL: not done.  onboarded_uidvalidity and onboarded_uid: the progress, the messages
-- of the folder up to that UID under that UIDVALIDITY are done (a crash resumes after them).  A rule
-- removed and added again is a new row, onboarded anew (the way to file again a folder's mail).
ALTER TABLE folder_tracking_rule
    ADD COLUMN onboarded_at timestamptz,
    ADD COLUMN onboarded_uidvalidity bigint,
    ADD COLUMN onboarded_uid bigint;

-- Rules added before onboarding existed were documented as filing only the mail that came (or was
-- moved) into their folder afterwards: they stay so, rather than announcing again, at the first
-- sync after the upgrade, every message their folders hold.
UPDATE folder_tracking_rule SET onboarded_at = created_at;
