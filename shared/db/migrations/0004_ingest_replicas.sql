-- Ingest replicas announce themselves here while they run, so that a replica that holds no lease
-- yet still counts when the others work out their fair share (mailboxes / live replicas) and give
-- leases up.  A replica renews its row with its leases; a row past expires_at is a dead replica.

CREATE TABLE ingest_replica (
    holder          text PRIMARY KEY,           -- the same holder name the replica's leases carry
    started_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);
CREATE INDEX ingest_replica_expires ON ingest_replica (expires_at);
