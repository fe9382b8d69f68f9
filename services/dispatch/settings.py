"""The dispatch service's own settings (``CONDUIT_DISPATCH_*``), beside the process-wide ones."""
from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.registry.models import host_problem


# An address literal (RFC 5321 4.1.3): [192.0.2.1] or [IPv6:2001:db8::1].
_ADDRESS_LITERAL = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]")


class DispatchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONDUIT_DISPATCH_", extra="ignore")

    # A request whose MIME would exceed this is rejected (reason too_large).
    # The consumer group; replicas of one deployment share it.
    group_id: str = "conduit-dispatch"
    max_message_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    # Temporary failures are retried until the request's deadline, or this long after it arrived.
    default_deadline_seconds: float = Field(3600.0, gt=0)
    # Retry delay: base * 2^(attempt-1), capped, times a jitter in [0.5, 1].
    retry_base_seconds: float = Field(30.0, gt=0)
    retry_cap_seconds: float = Field(900.0, gt=0)
    # Requests a worker holds in `sending` at most (claimed, not yet recorded): the most a kill -9
    # can leave ambiguous.  Also the concurrency of the send loop.
    wave_size: int = Field(128, ge=1, le=10_000)
    # Requests per consumer batch (one ledger transaction).
    batch_size: int = Field(500, ge=1, le=10_000)
    # How long the send loop reuses what the registry said about a sending mailbox (its profile,
    # whether it may send) before reading it again.
    mailbox_refresh_seconds: float = Field(2.0, ge=0)
    # A pending request whose mailbox may not send for now (inactive, not approved, not enabled, its
    # owner inactive) waits until its deadline, its mailbox looked at again this often.
    unavailable_recheck_seconds: float = Field(30.0, gt=0)
    # How often the retry loop looks for due requests and for orphans of dead workers.
    poll_seconds: float = Field(1.0, gt=0)
    # The wait for each SMTP reply, for connecting and the TLS handshake, and for progress while the
    # content is written (the server taking none of it for this long is a stall).
    smtp_timeout_seconds: float = Field(30.0, gt=0)
    # The wait for the reply to the final dot of DATA (RFC 5321 4.5.3.2.6, "DATA Termination": 10
    # minutes): servers scan the content before they answer, and a timeout there would make a
    # delivered message outcome_unknown.
    smtp_data_timeout_seconds: float = Field(600.0, gt=0)
    # An Exchange send whose answer was lost is looked up in Sent Items, and looked up again after
    # growing pauses until this long has passed: Graph answers sendMail before it has sent, and files
    # its copy seconds later.  0: one look-up.  A dead worker's rows get the rest of this window,
    # counted from when they were created.
    sent_items_window_seconds: float = Field(10.0, ge=0, le=300)
    # The name dispatch gives itself in EHLO (default: this host's name).
    helo_name: str | None = None
    # Burst mode (tests): also wait for retries due within this many seconds before returning.
    burst_horizon_seconds: float = Field(0.0, ge=0)

    @field_validator("helo_name")
    @classmethod
    def _helo_is_a_host(cls, value: str | None) -> str | None:
        # Written into the EHLO line as it is: a line break would be another SMTP command.
        if value is None or _ADDRESS_LITERAL.fullmatch(value):
            return value
        problem = host_problem(value)
        if problem is None and _is_ip_address(value):
            problem = "an IP address goes in brackets"
        if problem is not None:
            raise ValueError(f"must be a host name or an address literal such as [192.0.2.1] (RFC 5321 4.1.3): {problem}")
        return value


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
