"""`conduit send`: request an email through a mailbox, as any system would, on `email.outbound`.

It builds an ``EmailOutboundV1`` event from the options, publishes it and prints the idempotency
key.  With ``--wait`` it follows ``email.status`` until the request's final status (sent, failed or
rejected) and prints it; the exit code is 0 only when the email was sent.  Attached files travel
inline up to ``INLINE_ATTACHMENT_BYTES``; a larger one is stored in the raw store first and the
request refers to it, as any system sending a large attachment would.
"""
from __future__ import annotations

import base64
import mimetypes
import time
import unicodedata
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from conduit.cli.output import emit_json, escaped, fail, fields
from conduit.cli.runner import load_settings, org_option, run
from conduit.context import command_context
from shared.registry.models import WAITING_FOR_MAILBOX

FINAL = ("sent", "failed", "rejected")
# Inline attachments make the event itself large, and a broker refuses records over its limit
# (1 MB by default): above this, by reference to the raw store.
INLINE_ATTACHMENT_BYTES = 256 * 1024


def send(
    to: list[str] = typer.Option([], "--to", help="Recipient (repeat for several)."),
    cc: list[str] = typer.Option([], "--cc", help="Cc recipient (repeatable)."),
    bcc: list[str] = typer.Option([], "--bcc", help="Bcc recipient (repeatable)."),
    sender: Optional[str] = typer.Option(None, "--from", help="Address of the sending user, queue or mailbox."),
    mailbox: Optional[str] = typer.Option(None, "--mailbox", help="Id of the sending mailbox (instead of --from)."),
    subject: str = typer.Option("", "--subject", "-s", help="Subject (the tracking token is added when the organization uses one)."),
    text: Optional[str] = typer.Option(None, "--text", help="Plain-text body."),
    html: Optional[str] = typer.Option(None, "--html", help="HTML body."),
    header: list[str] = typer.Option([], "--header", "-H", help="Extra header 'Name: value' (allow-list: docs/dispatch.md)."),
    attach: list[Path] = typer.Option([], "--attach", help="Attach a file (repeatable); a large one goes by reference."),
    key: Optional[str] = typer.Option(None, "--key", help="Idempotency key (default: a new one); one send per key."),
    regarding: Optional[str] = typer.Option(None, "--regarding", help="The record it regards, as KIND:ID or KIND:ADDRESS (a contact, account or lead)."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not record an outgoing email activity."),
    deadline: Optional[datetime] = typer.Option(None, "--deadline", help="Stop retrying after this time (ISO 8601, with zone)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the final status and print it."),
    timeout: float = typer.Option(60.0, "--timeout", min=1, help="Seconds --wait waits."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
    org: str = org_option(),
) -> None:
    """Send an email through a mailbox: publish an email.outbound request (exactly one send per key)."""
    from shared.events.payloads import EmailOutboundV1

    checked_key(key)
    extra: dict[str, str] = {}
    for item in header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise fail(f"--header needs 'Name: value', got {item!r}")
        extra[name.strip()] = value.strip()
    data: dict[str, Any] = {
        "idempotency_key": key if key is not None else f"cli-{uuid.uuid4().hex}", "to": to, "cc": cc, "bcc": bcc, "subject": subject,
        "text": text, "html": html, "headers": extra, "track": not no_track, "deadline": deadline,
    }
    if mailbox:
        data["mailbox_id"] = mailbox
    if sender:
        data["sender_email"] = sender
    stored: list[bytes] = []   # the large attachments, stored before the request is published
    stored_sizes: dict[str, int] = {}
    if attach:
        from shared.rawstore import raw_sha256

        data["attachments"] = []
        for path in attach:
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise fail(f"--attach {path}: {exc.strerror or exc}") from None
            item: dict[str, Any] = {"filename": path.name,
                                    "content_type": mimetypes.guess_type(path.name)[0] or "application/octet-stream"}
            if len(content) <= INLINE_ATTACHMENT_BYTES:
                item["content_base64"] = base64.b64encode(content).decode()
            else:
                item["content_sha256"] = raw_sha256(content)
                stored.append(content)
                stored_sizes[item["content_sha256"]] = len(content)
            data["attachments"].append(item)
    record_ref = None   # a contact, account or lead named by its address: looked up below
    if regarding:
        kind, sep, rid = regarding.partition(":")
        if not sep:
            raise fail("--regarding needs KIND:ID or KIND:ADDRESS, e.g. account:1c2d3e4f-... or account:info@acme.example")
        if "@" in rid:
            record_ref = regarding
        else:
            data["regarding"] = {"kind": kind, "id": rid}
    try:
        payload = EmailOutboundV1.model_validate(data)
    except ValidationError as exc:
        raise fail(_in_options_words(exc)) from None
    if payload.deadline is not None and payload.deadline <= datetime.now(timezone.utc):
        # Published, it could only fail (deadline_exceeded): refused here, as dispatch's other refusals are.
        raise fail(f"--deadline {payload.deadline.isoformat()} has passed: give a time to come, or leave --deadline out")

    async def go() -> int:
        nonlocal payload
        _check_size(payload, stored_sizes)   # before anything is stored or published
        async with command_context(load_settings(), org) as ctx:
            if record_ref is not None:
                payload = payload.model_copy(update={"regarding": await _regarding(ctx, record_ref)})
            if stored:
                from shared.rawstore import store_raw

                async with ctx.registry.pool.acquire() as conn:
                    await store_raw(conn, stored)
            return await publish_request(ctx, payload, producer="conduit send", wait=wait, timeout=timeout, json_=json_)

    code = run(go)
    if code:
        raise typer.Exit(code)


# The request's fields as `conduit send` names them, for its errors.
_OPTIONS = {"to": "--to", "cc": "--cc", "bcc": "--bcc", "sender_email": "--from", "mailbox_id": "--mailbox",
            "subject": "--subject", "text": "--text", "html": "--html", "headers": "--header", "attachments": "--attach",
            "idempotency_key": "--key", "regarding": "--regarding", "deadline": "--deadline"}


def _in_options_words(exc: ValidationError) -> str:
    """The request's first validation error, naming the option rather than the field."""
    first = exc.errors()[0]
    where = _OPTIONS.get(str(first["loc"][0]), ".".join(str(p) for p in first["loc"])) if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    for field, option in _OPTIONS.items():
        if "_" in field:   # only names that are no English word ("to", "text" are)
            message = message.replace(field, option)
    return f"{where}: {message}" if where else message


async def _regarding(ctx: Any, ref: str) -> Any:
    """``--regarding KIND:ADDRESS``: the organization's contact, account or lead with that address."""
    from shared.events.payloads import RegardingRef
    from shared.registry.folder_rules import resolve_record

    async with ctx.registry.pool.acquire() as conn:
        record = await resolve_record(conn, ctx.org.id, ref)
    return RegardingRef(kind=record["kind"], id=record["id"])


def checked_key(key: str | None) -> None:
    """Refuse an idempotency key given on the command line that would not do what the user means:
    an empty one (it used to stand for a new random key: a retry would send twice), one with a
    control character or line break (dispatch would refuse it; it breaks tables and logs), or with
    whitespace around it (`conduit outbound show` strips what it is given, and would not find it)."""
    if key is None:
        return
    if not key.strip():
        raise fail("--key is empty: give a key of your own, or leave --key out for a new one")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in key):
        raise fail(f"--key '{escaped(key)}' holds a control character or line break: a key is one line of text")
    if key != key.strip():
        raise fail(f"--key {key!r} begins or ends with whitespace: `conduit outbound show` could not find it")


def _check_size(payload: Any, stored_sizes: dict[str, int]) -> None:
    """Refuse what dispatch would reject as too_large (its estimate, against its limit as this
    environment sets it), before a large attachment is stored in PostgreSQL for nothing."""
    from services.dispatch.compose import estimated_size
    from services.dispatch.settings import DispatchSettings

    try:
        limit = DispatchSettings().max_message_bytes
    except ValidationError:
        # Another CONDUIT_DISPATCH_* setting of this shell is wrong: dispatch's to report where it
        # runs, not a reason to refuse this email (dispatch enforces its limit itself).
        return
    size = estimated_size(payload, stored_sizes)
    if size > limit:
        raise fail(f"the email would be about {size / 2**20:.1f} MB with its attachments encoded, over dispatch's "
                   f"size limit of {limit / 2**20:.1f} MB ({limit} bytes, CONDUIT_DISPATCH_MAX_MESSAGE_BYTES as "
                   "this environment sets it)")


async def publish_request(ctx: Any, payload: Any, *, producer: str, wait: bool, timeout: float, json_: bool) -> int:
    """Publish an ``EmailOutboundV1`` on email.outbound and print its key (with ``wait``, its final
    status); the exit code: 0 unless waiting ended in anything but sent."""
    from shared.events.envelope import Envelope
    from shared.events.payloads import EmailOutboundV1
    from shared.kafka import Publisher, ensure_topics

    settings = ctx.settings
    # Dispatch carries the correlation id into every status of the request: with it, `--wait` takes
    # only this request's statuses, never an earlier one's for the same key (a `rejected` re-read
    # from before the follower's start: Tansu's end offsets may fall inside the last record batch).
    event = Envelope[EmailOutboundV1](type="email.outbound", schema_version=1, producer=producer,
                                      organization_id=ctx.org.id, data=payload, correlation_id=f"send-{uuid.uuid4().hex}")
    await ensure_topics(settings)
    holder = await _held_by_another(ctx, payload)
    if holder is not None:
        # Dispatch would dead-letter it as idempotency_key_reused: say so now, not after publishing.
        raise fail(f"the key {payload.idempotency_key!r} is already used by a different request ({holder}); "
                   "a different email needs a key of its own (or leave --key out)")
    # A key already sent or failed publishes no new status: the request is a no-op, and its stored
    # status is the answer at once (a rejected key is taken over by the new request: wait for it).
    row = await _ledger_row(ctx, payload.idempotency_key)
    if row is None or row.status == "rejected":
        row = None
        # A new request that dispatch would reject (and dead-letter): said now, before anything is
        # published.  Not for a key already used: its outcome stands whatever the mailbox is now.
        refused = await _refused_now(ctx, payload)
        if refused is not None:
            raise fail(f"dispatch would refuse this request ({refused[0]}): {refused[1]}")
    earlier = _final(row)
    follower = _StatusFollower(settings, ctx.org.id) if wait and earlier is None else None
    if follower is not None:
        await follower.start()
    if earlier is None:   # a request already sent or failed is answered from the ledger: nothing to publish
        publisher = Publisher(settings, client_id="conduit-send")
        await publisher.start()
        try:
            await publisher.publish("email.outbound", event, payload.idempotency_key)
        finally:
            await publisher.stop()
    if follower is None and earlier is None:
        emit_json({"idempotency_key": payload.idempotency_key, "event_id": str(event.event_id)}) if json_ \
            else typer.echo(payload.idempotency_key)
        return 0
    status = earlier
    if follower is not None:
        try:
            status = await follower.final(payload.idempotency_key, event.correlation_id, timeout)
        finally:
            await follower.stop()
    if status is None:
        row = await _ledger_row(ctx, payload.idempotency_key)
        status = _final(row)
    if status is None:
        typer.echo(payload.idempotency_key)
        raise fail(f"no final status within {timeout:.0f} s: {_where_it_stands(row)}", code=1)
    if json_:
        emit_json(status)
    else:
        typer.echo(payload.idempotency_key)
        fields([(k, v) for k, v in status.items() if v not in (None, "", 0) or k == "status"])
    return 0 if status["status"] == "sent" else 1


def progress(status: Any) -> str:
    """A status on the way, in words: what happened to the last attempt."""
    words = status.status.replace("_", " ")
    if status.reason and (not status.attempt or status.reason in WAITING_FOR_MAILBOX):
        # Held back before any attempt, or waiting for its mailbox (inactive, backing off, ...): no
        # attempt failed for it.
        words += f" ({status.reason}): {status.detail or ''}"
    elif status.reason:
        reply = f": SMTP {status.smtp_code} {status.smtp_reply}" if status.smtp_code else ""
        words += f", after attempt {status.attempt} failed ({status.reason}){reply or ': ' + (status.detail or '')}"
    return words.rstrip(": ")


class _StatusFollower:
    """Reads email.status from the offsets it had before the request was published."""

    def __init__(self, settings: Any, org_id: Any) -> None:
        self._settings = settings
        self._org_id = org_id   # keys are per organization: another one's "invoice-42" is not ours
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from shared.kafka import client_options, topic_name

        name = topic_name(self._settings, "email.status")
        self._consumer = AIOKafkaConsumer(**client_options(self._settings), enable_auto_commit=False)
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(name)
        if not partitions:
            await self._consumer._client.force_metadata_update()  # aiokafka: no public refresh
            partitions = self._consumer.partitions_for_topic(name) or set()
        tps = [TopicPartition(name, p) for p in partitions]
        self._consumer.assign(tps)
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            self._consumer.seek(tp, ends[tp])

    async def final(self, key: str, correlation_id: str | None, timeout: float) -> dict[str, Any] | None:
        from shared.events.envelope import Envelope
        from shared.events.payloads import EmailStatusV1

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    event = Envelope[EmailStatusV1].model_validate_json(record.value)
                    if event.organization_id != self._org_id or event.data.idempotency_key != key \
                            or event.correlation_id != correlation_id:
                        continue
                    if event.data.status in FINAL:
                        return event.data.model_dump(mode="json")
                    # Progress, on stderr (stdout stays the answer): a retry is seen as it happens,
                    # not only as a timeout.
                    typer.echo(f"{key}: {progress(event.data)}", err=True)
        return None

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


async def _refused_now(ctx: Any, payload: Any) -> tuple[str, str] | None:
    """(reason, words) when dispatch would refuse the request as things stand: a header outside the
    allow-list, no such sending mailbox, or one that may not send; else None."""
    from services.dispatch.compose import check_headers
    from services.dispatch.ledger import mailbox_states, refusal, resolve_senders
    from shared.errors import InvalidInput

    try:
        check_headers(payload.headers)
    except InvalidInput as exc:
        return exc.reason, exc.message
    async with ctx.registry.pool.acquire() as conn:
        (mailbox_id,) = await resolve_senders(conn, [(ctx.org.id, payload.mailbox_id,
                                                      None if payload.mailbox_id else payload.sender_email)])
        states = await mailbox_states(conn, {mailbox_id}) if mailbox_id is not None else {}
    if mailbox_id is None:
        who = payload.mailbox_id or payload.sender_email
        without = None if payload.mailbox_id else await _owner_without_mailbox(ctx, payload.sender_email)
        return "unknown_mailbox", without or f"no mailbox, user or queue {who} in the organization"
    return refusal(states.get(mailbox_id))


async def _owner_without_mailbox(ctx: Any, address: str) -> str | None:
    """Why a user or queue with this address cannot send (it has no mailbox), or None when there is
    none: "no such user" would send the user looking for a typo that is not there."""
    owners = [("user", o) for o in await ctx.registry.users(ctx.org)] + [("queue", o) for o in await ctx.registry.queues(ctx.org)]
    for kind, owner in owners:
        if owner.email.lower() == address.lower() and owner.mailbox_id is None:
            return (f"the {kind} {owner.email} exists but has no mailbox (added with incoming {owner.incoming_method}, "
                    f"outgoing {owner.outgoing_method}): a {kind} gets one when added with server-side sync, the default "
                    f"of `conduit {kind} add`; `conduit mailbox list` shows the mailboxes that can send")
    return None


async def _held_by_another(ctx: Any, payload: Any) -> str | None:
    """The status of the request holding the payload's key when it is a different request (a rejected
    one gives its key up), else None."""
    from services.dispatch.ledger import key_holders, stored_request

    async with ctx.registry.pool.acquire() as conn:
        (holder,) = await key_holders(conn, [(ctx.org.id, payload.idempotency_key, stored_request(payload))])
    return holder["status"] if holder["status"] not in (None, "rejected") and not holder["same"] else None


async def _ledger_row(ctx: Any, key: str) -> Any:
    """The send ledger's request under exactly this key, or None."""
    from shared.errors import NotFound

    try:
        r = await ctx.registry.outbound_request(ctx.org, key)
    except NotFound:
        return None
    return r if r.idempotency_key == key else None


def _where_it_stands(row: Any) -> str:
    """Why a wait ended without a final status: the request's row in the send ledger, or its absence."""
    if row is None:
        return "dispatch has not taken the request yet (is the dispatch service running?)"
    return f"the send ledger says: {row.explanation()}"


def _final(r: Any) -> dict[str, Any] | None:
    """A key used before publishes no new status: its final one is in the send ledger (as an
    ``email.status`` event's fields)."""
    if r is None or r.status not in FINAL:
        return None
    return {"idempotency_key": r.idempotency_key, "status": r.status, "request_id": str(r.id),
            "mailbox_id": str(r.mailbox_id) if r.mailbox_id else None, "reason": r.reason, "detail": r.detail,
            "smtp_code": r.smtp_code, "smtp_reply": r.smtp_reply, "message_id": r.message_id,
            "activity_id": str(r.activity_id) if r.activity_id else None, "attempt": r.attempts}


def main() -> None:
    """`python -m conduit.cli.send_cmd`: the command on its own (the same as `conduit send`)."""
    typer.run(send)


if __name__ == "__main__":
    main()
