-- Outbound requests and the send ledger.  One row per (organization, idempotency key): a
-- redelivered or replayed email.outbound event finds its row and does nothing.  The row walks
-- pending_send -> sending -> sent | failed (or is rejected at once); see docs/dispatch.md.
--
-- A row is committed in `sending`, with its Message-ID, tracking token and the worker that
-- claimed it, BEFORE the mail transaction starts.  A row found in `sending` whose worker is gone
-- (its advisory lock is free) is an ambiguous outcome and is never resent blindly.

CREATE TABLE outbound_email (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    mailbox_id      uuid REFERENCES mailbox(id) ON DELETE SET NULL,
    status          text NOT NULL CHECK (status IN ('pending_send','sending','sent','failed','rejected')),
    reason          text,
    detail          text,
    smtp_code       int,
    smtp_reply      text,
    message_id      text,                   -- without angle brackets, as email_activity stores it
    subject         text,                   -- as sent: with the tracking token when enabled
    tracking_token  text,
    transport       text,                   -- smtp, ews or graph: chosen when last claimed
    activity_id     uuid REFERENCES email_activity(id) ON DELETE SET NULL,
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    deadline        timestamptz,
    worker_id       bigint,                 -- the dispatch worker holding the row in `sending`
    request         jsonb NOT NULL,
    event_id        uuid,                   -- the email.outbound event that created the row
    correlation_id  text,
    requested_at    timestamptz,            -- the request event's occurred_at (latency metric)
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, idempotency_key)
);
CREATE INDEX outbound_email_due ON outbound_email (next_attempt_at) WHERE status = 'pending_send';
CREATE INDEX outbound_email_sending ON outbound_email (worker_id) WHERE status = 'sending';
CREATE INDEX outbound_email_message_id ON outbound_email (organization_id, message_id);

-- Dispatch workers number themselves from this sequence and hold a session advisory lock on the
-- number for their lifetime: a free lock means the worker died.
CREATE SEQUENCE dispatch_worker_seq;
