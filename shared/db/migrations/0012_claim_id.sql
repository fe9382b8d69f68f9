-- The transaction that claimed a row (pending_send -> sending), chosen by the worker before it
-- commits.  A worker whose COMMIT's answer was lost with its connection cannot tell whether it
-- holds the rows it claimed; it looks them up by this id and sends them (services/dispatch).
ALTER TABLE outbound_email ADD COLUMN claim_id uuid;
