-- Messages evaluate holds instead of deciding: their mailbox may not process email *for now*
-- (inactive, no profile, address not approved, incoming disabled: an administrator's toggle, a
-- Test & Enable re-run), or older messages of the mailbox are held before them.  A held message is
-- evaluated again, through the normal rule chain, once the mailbox may process email again
-- (services/evaluate/release.py); until then its decision says so.
--
-- The decision row of a held message has held = true: `conduit message why` shows it as waiting,
-- and the final decision replaces it (any other decision is never rewritten).
ALTER TABLE email_decision ADD COLUMN held boolean NOT NULL DEFAULT false;

-- What a held message needs to be evaluated again: the email.received event as it was consumed.
-- Written in the transaction that records the held decision, before the offset is committed;
-- deleted in the transaction that records the final one.
CREATE TABLE held_message (
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,   -- the mailbox it waits for
    message_id      text NOT NULL,                                            -- as in email_decision
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    -- Evaluated for the user or queue that forwarded it: their mailbox's guards read differently.
    forwarded       boolean NOT NULL,
    raw_sha256      text NOT NULL REFERENCES raw_message(sha256),
    event           jsonb NOT NULL,
    -- The order it was held in: a mailbox's held messages are evaluated again in the order it
    -- received them, so a reply is never evaluated before the message it answers.
    seq             bigserial NOT NULL,
    held_since      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, message_id)
);
CREATE INDEX held_message_in_order ON held_message (seq);
-- Which mailboxes hold messages, of which kind (the consumer's look per batch, the release's per look).
CREATE INDEX held_message_by_kind ON held_message (mailbox_id, forwarded);
CREATE INDEX held_message_by_message ON held_message (organization_id, message_id);
