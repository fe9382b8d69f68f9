-- When the current attempt was cleared to reach its transport.  Dispatch commits it, a few requests
-- per round trip, just before it hands a claimed request to its SMTP pool or Exchange client, and a
-- claim clears it.  A dead worker's `sending` rows without it never reached a server: they go back to
-- `pending_send` and are sent by another worker, instead of failing as `outcome_unknown`.

ALTER TABLE outbound_email ADD COLUMN started_at timestamptz;
