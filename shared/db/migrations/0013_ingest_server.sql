-- The server and account a mailbox's ingest state was read from.  Folder states, UIDs, UIDLs and
-- refusals only mean something on that server: when a mailbox is pointed at another server or
-- account, they are forgotten (services/ingest/state.py, bind_server), so a UIDVALIDITY that
-- happens to match cannot make ingest skip the new server's first messages, nor a queue delete
-- whichever message has an old UID there.
CREATE TABLE ingest_server (
    mailbox_id      uuid PRIMARY KEY REFERENCES mailbox(id) ON DELETE CASCADE,
    server          text NOT NULL,
    bound_at        timestamptz NOT NULL DEFAULT now()
);
