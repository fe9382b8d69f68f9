-- Outbound requests and the send ledger: one row per (organization, idempotency key), so a
-- redelivered or replayed email.outbound event is a no-op.

CREATE TABLE outbound_email (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    mailbox_id      uuid REFERENCES mailbox(id) ON DELETE SET NULL,
    status          text NOT NULL CHECK (status IN ('pending_send','sending','sent','failed')),
    reason          text,
    detail          text,
    smtp_code       int,
    smtp_reply      text,
    message_id      text,
    activity_id     uuid REFERENCES email_activity(id) ON DELETE SET NULL,
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    deadline        timestamptz,
    request         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, idempotency_key)
);
CREATE INDEX outbound_email_due ON outbound_email (next_attempt_at) WHERE status IN ('pending_send','sending');
