"""Every metric name in one place (docs/operations.md lists them).  No mailbox ids as labels:
cardinality stays bounded."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("conduit_events_consumed_total", "Events consumed and committed", ["service", "topic"])
EVENTS_DEAD_LETTERED = Counter("conduit_events_dead_lettered_total", "Events sent to a dead-letter topic", ["service", "topic", "reason"])
OUTBOX_PUBLISHED = Counter("conduit_outbox_published_total", "Outbox events published", ["service"])
MESSAGES_INGESTED = Counter("conduit_messages_ingested_total", "Messages pulled from mail servers", ["protocol"])
MAILBOX_FAILURES = Counter("conduit_mailbox_failures_total", "Mailbox-level failures", ["direction", "reason"])
INFRASTRUCTURE_FAILURES = Counter("conduit_infrastructure_failures_total", "Failures of Conduit's own database or broker "
                                  "met while working a mailbox (no mailbox alert)", ["service", "error"])
ACTIVITIES_CREATED = Counter("conduit_activities_created_total", "Email activities recorded", ["direction"])
DECISIONS = Counter("conduit_decisions_total", "Tracking decisions", ["tracked", "reason"])
HELD_RELEASED = Counter("conduit_held_messages_released_total", "Held messages evaluated again and decided for good")
EMAILS_SENT = Counter("conduit_emails_sent_total", "Outbound emails by final status", ["status", "transport"])
SEND_LATENCY = Histogram("conduit_send_latency_seconds", "From request to accepted by the server", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
MAILBOXES_LEASED = Gauge("conduit_mailboxes_leased", "Mailboxes this ingest replica works")
FOLLOW_UP_POLLS = Counter("conduit_imap_follow_up_polls_total", "NOOPs of idling sessions following up new mail")
MAILBOXES_BY_HEALTH = Gauge("conduit_mailboxes_by_health", "Mailboxes in each health state, in the partitions this "
                            "replica owns", ["state"])
SERVICE_UP = Gauge("conduit_service_up", "1 while the service runs", ["service"])
