-- Stopping a mailbox's direction after refused sign-ins, until Test & Enable (opt-in, per profile).
--
-- A mailbox whose password is wrong is retried with back-off (capped at an hour): some 24 sign-ins
-- a day, which an Active Directory account-lockout policy counts.  A profile may instead stop a
-- direction after this many refused sign-ins in a row (`conduit profile set --stop-after-refused-logins`):
-- its Test & Enable result becomes a failure saying why, so `mailboxes_to_process` no longer returns
-- it, and nothing signs in again until an administrator runs Test & Enable successfully.
-- NULL: never stop (the default: back off and recover by itself, as before).
ALTER TABLE email_server_profile
    ADD COLUMN stop_after_refused_logins int CHECK (stop_after_refused_logins BETWEEN 1 AND 100);

-- Per direction: the sign-ins the server refused since the last one it accepted (reset by a working
-- session, a successful Test & Enable, new mailbox credentials, and a profile edit that changes how
-- its mailboxes sign in or where); and when the direction was stopped for them (NULL: not stopped;
-- cleared by the next Test & Enable, whatever its result).
ALTER TABLE mailbox
    ADD COLUMN incoming_refused_logins int NOT NULL DEFAULT 0,
    ADD COLUMN outgoing_refused_logins int NOT NULL DEFAULT 0,
    ADD COLUMN act_refused_logins int NOT NULL DEFAULT 0,
    ADD COLUMN incoming_stopped_at timestamptz,
    ADD COLUMN outgoing_stopped_at timestamptz,
    ADD COLUMN act_stopped_at timestamptz;
