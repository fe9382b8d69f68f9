-- Further copies, on the server, of a message already ingested for the mailbox: the same message
-- delivered twice (through two distribution lists, an alias and its owner, a sender's retry): the
-- same Message-ID and the same From, To, Cc, Date, Subject and body.  Another message that merely
-- reuses the Message-ID (a scanner's fixed one, a forged one) is no copy and is never deleted.
-- Nothing is published for copies; a queue that deletes after processing records them here and
-- removes them from the server with the copy that was ingested, once its activity is durable
-- (services/ingest/publishing.py: same_message; state.py: record_copies, deletable, mark_removed).
CREATE TABLE ingested_copy (
    mailbox_id      uuid NOT NULL,
    message_key     text NOT NULL,
    folder          text,                       -- IMAP: where the copy is
    uidvalidity     bigint,
    uid             bigint,
    uidl            text,                       -- POP3 unique id
    FOREIGN KEY (mailbox_id, message_key) REFERENCES ingested_message (mailbox_id, message_key) ON DELETE CASCADE
);
-- A mailbox's copies (the removal's look-up), and a message's (the cascade from ingested_message).
CREATE INDEX ingested_copy_by_message ON ingested_copy (mailbox_id, message_key);
CREATE UNIQUE INDEX ingested_copy_imap ON ingested_copy (mailbox_id, folder, uidvalidity, uid) WHERE uid IS NOT NULL;
CREATE UNIQUE INDEX ingested_copy_pop3 ON ingested_copy (mailbox_id, uidl) WHERE uidl IS NOT NULL;
