"""The evaluate service's own settings (``CONDUIT_EVALUATE_*``), beside the process-wide ones."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EvaluateSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONDUIT_EVALUATE_", extra="ignore")

    # The consumer group; replicas of one deployment share it.
    group_id: str = "conduit-evaluate"
    # `email.received` events per batch: one raw load, one look-up per key kind, one transaction.
    max_batch: int = Field(500, ge=1, le=10_000)
    # The raw mail a batch loads at once: a larger batch (large attachments) is evaluated a part at a
    # time, each part its own transaction, so memory stays bounded (about twice this, with the next
    # batch prepared meanwhile, plus what parsing takes).
    max_batch_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)
    # Keep the mailbox health aggregate (faust, `mailbox.health`) in this process.  Not in burst
    # runs, which end when the backlog does.  Off when ops run it elsewhere or do not want it.
    health_aggregate: bool = True
    # How long its start may take (broker answers, table recovered) before it is given up and tried
    # again later; mail is evaluated meanwhile either way.
    health_start_seconds: float = Field(120.0, gt=0, le=3600)
    # How often (and at start) evaluate looks for mailboxes with held messages that may process email
    # again, and how many held messages it evaluates again per batch (one transaction each).
    release_seconds: float = Field(5.0, gt=0, le=3600)
    release_batch: int = Field(500, ge=1, le=10_000)
    # How long a copy of an email Conduit is sending (to a tracked mailbox of the organization) waits
    # for dispatch to record the send, counted from when the send was cleared to reach its server:
    # normally milliseconds; longer only when dispatch stopped mid-send, and then the copy is
    # evaluated as any mail once this has passed.  0: never wait.
    send_wait_seconds: float = Field(120.0, ge=0, le=86_400)
