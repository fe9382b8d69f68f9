-- Messages a mail server refuses to hand over (an IMAP UID FETCH answered NO for that message, a
-- POP3 RETR answered -ERR), counted across syncs.  Until a message has been refused a few times the
-- folder's saved state stays below it, so nothing after it is lost; then it is skipped, and the row
-- (with skipped_at) is the record that it never became an email.received event.

CREATE TABLE refused_message (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    folder          text NOT NULL,              -- IMAP folder; '' for POP3
    uidvalidity     bigint NOT NULL,            -- the UID's numbering; 0 for POP3
    server_id       text NOT NULL,              -- IMAP UID (decimal) or POP3 UIDL
    attempts        integer NOT NULL DEFAULT 1,
    reason          text NOT NULL,              -- what the server said, last time
    first_refused_at timestamptz NOT NULL DEFAULT now(),
    last_refused_at timestamptz NOT NULL DEFAULT now(),
    skipped_at      timestamptz,                -- given up: never asked for again
    PRIMARY KEY (mailbox_id, folder, uidvalidity, server_id)
);
