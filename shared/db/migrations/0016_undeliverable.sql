-- "Move failed email to an Undeliverable folder" (the profile's move_failed_to_undeliverable): a
-- message ingest gave up on (the server refused to hand it over, refused_message.skipped_at) is
-- moved out of its tracked IMAP folder into the mailbox's Undeliverable folder, where its owner
-- sees it was not tracked.  When that was done: a moved message is not moved again.
ALTER TABLE refused_message ADD COLUMN moved_at timestamptz;
