-- Smart matching's threshold, per organization: how many participants (senders and recipients) a
-- message must share with a tracked email of the same normalised subject to be correlated to it.
-- The receiving mailbox's own address never counts (every mail to a queue shares it).  1 keeps the
-- behaviour before this setting; a larger number ties fewer unrelated conversations together.
ALTER TABLE organization
    ADD COLUMN smart_matching_min_recipients int NOT NULL DEFAULT 1
        CHECK (smart_matching_min_recipients BETWEEN 1 AND 50);
