-- The activity a correlated email was linked to (the reference's email.CorrelatedActivityId): the
-- tracked email a reply answers, found by the method `correlated_by` names (In-Reply-To, References,
-- tracking token, conversation index, smart matching).  Evaluate writes it as it records the reply,
-- and `activity.created` carries it, so a CRM subscriber can thread the two without matching headers
-- itself.  NULL: not correlated (and every activity recorded before this column existed).
--
-- ON DELETE SET NULL: the reply stays an activity of its own when the one it answered goes.
--
-- No index.  Nothing looks activities up by the activity they answer (correlation goes the other
-- way: by Message-ID, token, thread root and subject, which have theirs), and every insert would pay
-- for one.  The foreign key's only reader is a delete of an activity, and Conduit deletes none (only
-- removing a whole organization would, as email_decision.activity_id, which has no index either).
ALTER TABLE email_activity
    ADD COLUMN correlated_activity_id uuid REFERENCES email_activity(id) ON DELETE SET NULL;
