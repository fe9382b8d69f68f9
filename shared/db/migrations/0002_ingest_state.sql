-- Ingest bookkeeping: per-folder IMAP sync state, POP3 UIDL, message identities already ingested
-- (so a message moved between tracked folders is not processed twice), and mailbox leases that
-- let several ingest replicas share the mailboxes.

CREATE TABLE imap_folder_state (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    folder          text NOT NULL,
    uidvalidity     bigint NOT NULL,
    last_uid        bigint NOT NULL DEFAULT 0,
    highestmodseq   bigint,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, folder)
);

CREATE TABLE pop3_seen (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    uidl            text NOT NULL,
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, uidl)
);

CREATE TABLE ingested_message (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    message_key     text NOT NULL,              -- Message-ID, or the raw hash when there is none
    raw_sha256      text NOT NULL,
    folder          text,                       -- IMAP: where it was found (for delete after processing)
    uid             bigint,
    uidl            text,                       -- POP3 unique id
    removed_from_server boolean NOT NULL DEFAULT false,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, message_key)
);

CREATE TABLE mailbox_lease (
    mailbox_id      uuid PRIMARY KEY REFERENCES mailbox(id) ON DELETE CASCADE,
    holder          text NOT NULL,
    expires_at      timestamptz NOT NULL
);
CREATE INDEX mailbox_lease_holder ON mailbox_lease (holder);
