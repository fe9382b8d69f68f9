-- Dead letters replayed to the topic they came from (`conduit dead-letters replay`), so that the
-- list can say which were and a second replay skips them unless asked.  A dead letter is named by
-- its physical dead-letter topic (prefix included: deployments may share a database), partition,
-- offset and broker timestamp (a new broker's offsets are not mistaken for the old one's).
-- Written after the broker acknowledged the replay: a crash in between only means the next replay
-- publishes it again, which the topic's idempotent consumer absorbs.
CREATE TABLE dead_letter_replay (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    logged_at   timestamptz NOT NULL,
    replayed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset", logged_at)
);
