-- Folder-level tracking rules (the reference's MailboxTrackingFolder): a mailbox's folder mapped to
-- a record, so that the email ingested from that folder is tracked regarding that record, whatever
-- the mailbox's tracking option (evaluate's `folder_tracking` rule).
--
-- A folder is known by its name, as the mailbox's tracked folders name it and as `email.received`
-- carries it (`data.folder`); the Inbox is always spelled INBOX.  Exchange knows folders by an id
-- that survives a rename: `folder_id` holds it for an Exchange mailbox (exchange_sync, later), and
-- stays NULL for IMAP, whose folders have no such id.
CREATE TABLE folder_tracking_rule (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    folder          text NOT NULL CHECK (length(folder) BETWEEN 1 AND 1000),
    folder_id       text CHECK (length(folder_id) BETWEEN 1 AND 1000),
    regarding_kind  text NOT NULL CHECK (regarding_kind IN ('contact','account','lead')),
    -- A record deleted takes its rules with it: a rule never points at nothing.
    regarding_id    uuid NOT NULL REFERENCES crm_record(id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- One rule per folder: the primary key is also evaluate's look-up, (mailbox, folder) per message.
    PRIMARY KEY (mailbox_id, folder)
);
CREATE INDEX folder_tracking_rule_by_record ON folder_tracking_rule (regarding_id);
