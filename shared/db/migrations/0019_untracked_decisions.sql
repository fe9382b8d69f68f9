-- Decisions a tracking option made "not tracked", by message: evaluate looks for them after every
-- batch (``repository.link_to_activities``: a message two replicas decided at once for two
-- mailboxes, one of which made it an activity).  Only those rows are indexed, so the look-up for a
-- batch's 500 messages stays a few small index probes however many decisions there are.
CREATE INDEX email_decision_untracked ON email_decision (organization_id, message_id) WHERE NOT tracked AND NOT held;
