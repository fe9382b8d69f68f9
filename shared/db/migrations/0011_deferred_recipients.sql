-- Recipients an SMTP server deferred (4xx to RCPT) while it accepted the message for the others.
-- The request goes back to pending_send and its next attempts send the same bytes to these
-- recipients only, so nobody who already has the message gets it twice.  NULL: every recipient.
ALTER TABLE outbound_email ADD COLUMN deferred_recipients text[];
