"""The in-memory Exchange organization both simulated protocols (EWS and Graph) read and write.

One ``Organization`` holds mailboxes (by SMTP address) with the well-known folders every Exchange
mailbox has (the EWS ``DistinguishedFolderId`` names, which Graph also accepts as well-known folder
names), custom folders and items; the principals that may log in (mailbox owners and service accounts,
with ApplicationImpersonation, FullAccess and SendAs rights); registered OAuth applications and the
tokens issued to them; and a record of every message sent.

Sending follows what Exchange does with a submitted message: a copy is filed in the sender's Sent
Items when asked, one copy without the ``Bcc`` header lands in the Inbox of each recipient who is a
mailbox of this organization, and recipients outside it are accepted (Exchange accepts them and would
bounce later with a non-delivery report; here they are only recorded).  A message without a
``Message-ID`` gets one, as the Exchange transport assigns one; an existing one is kept.  Filing
and delivery happen as the send is accepted, unless the send was told to file late (``file_late``):
Graph's ``sendMail`` answers ``202 Accepted`` before Exchange has sent, and the copy shows up in Sent
Items seconds later.  A late filing is carried out by ``file_due``, which the protocol handlers call
before serving each request: the copy appears, by the organization's clock, to whoever looks next,
with no timer running in between.

Every change to a folder's items is appended to a per-folder change log stamped with an
organization-wide sequence number; EWS ``SyncFolderItems`` sync states and Graph delta tokens are
positions in that log.
"""
from __future__ import annotations

import base64
import copy
import email.policy
import itertools
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, getaddresses, make_msgid, parsedate_to_datetime

# (distinguished id, display name, folder class, parent distinguished id): the folders every mailbox has.
WELL_KNOWN_FOLDERS = (
    ("root", "Root", "", None),
    ("msgfolderroot", "Top of Information Store", "IPF.Note", "root"),
    ("inbox", "Inbox", "IPF.Note", "msgfolderroot"),
    ("sentitems", "Sent Items", "IPF.Note", "msgfolderroot"),
    ("drafts", "Drafts", "IPF.Note", "msgfolderroot"),
    ("deleteditems", "Deleted Items", "IPF.Note", "msgfolderroot"),
    ("outbox", "Outbox", "IPF.Note", "msgfolderroot"),
    ("junkemail", "Junk Email", "IPF.Note", "msgfolderroot"),
    ("calendar", "Calendar", "IPF.Appointment", "msgfolderroot"),
    ("contacts", "Contacts", "IPF.Contact", "msgfolderroot"),
    ("tasks", "Tasks", "IPF.Task", "msgfolderroot"),
)

GRAPH_AUDIENCE = "https://graph.microsoft.com"
EWS_AUDIENCE = "https://outlook.office365.com"

_PARSER = BytesParser(policy=email.policy.default)


def new_id() -> str:
    """An opaque, URL-safe id in the style of Exchange's (base64 of an entry id)."""
    return "AAMk" + base64.urlsafe_b64encode(uuid.uuid4().bytes + secrets.token_bytes(8)).decode().rstrip("=")


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Address:
    email: str
    name: str = ""


@dataclass
class Attachment:
    name: str
    content_type: str
    content: bytes
    id: str = field(default_factory=new_id)


@dataclass
class Item:
    """One mailbox item.  Messages carry their MIME; other kinds keep their properties in ``fields``."""

    folder_id: str
    item_class: str = "IPM.Note"
    mime: bytes | None = None
    subject: str = ""
    body: str = ""
    body_type: str = "Text"  # EWS BodyType: "Text" or "HTML"
    internet_message_id: str | None = None
    sender: Address | None = None
    from_: Address | None = None
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    date_sent: datetime | None = None
    date_received: datetime | None = None
    date_created: datetime | None = None
    is_read: bool = False
    is_draft: bool = False
    in_reply_to: str | None = None
    references: str | None = None
    conversation_id: str = ""
    fields: dict[str, object] = field(default_factory=dict)  # appointments, contacts, tasks
    id: str = field(default_factory=new_id)
    version: int = 1

    @property
    def change_key(self) -> str:
        return "CQAAABYAAA" + base64.urlsafe_b64encode(f"{self.id[-8:]}:{self.version}".encode()).decode()

    @property
    def size(self) -> int:
        return len(self.mime) if self.mime is not None else len(self.body.encode())

    @classmethod
    def from_mime(cls, mime: bytes, folder_id: str, *, now: datetime) -> Item:
        msg = _PARSER.parsebytes(mime)
        body_part = msg.get_body(preferencelist=("html", "plain"))
        body, body_type = "", "Text"
        if body_part is not None:
            try:
                body = body_part.get_content()
            except (LookupError, ValueError):  # an unknown charset: keep the raw text, as Exchange would show it
                body = body_part.get_payload(decode=True).decode("utf-8", "replace")
            body_type = "HTML" if body_part.get_content_type() == "text/html" else "Text"
        attachments = [
            Attachment(name=part.get_filename() or "attachment", content_type=part.get_content_type(),
                       content=part.get_payload(decode=True) or b"")
            for part in msg.iter_attachments()
        ]
        from_ = _first(msg.get_all("From"))
        sender = _first(msg.get_all("Sender")) or from_
        try:
            sent = parsedate_to_datetime(msg["Date"]) if msg["Date"] else now
        except (TypeError, ValueError):
            sent = now
        refs = str(msg["References"]) if msg["References"] else None
        return cls(
            folder_id=folder_id, mime=mime, subject=str(msg["Subject"] or ""), body=str(body), body_type=body_type,
            internet_message_id=str(msg["Message-ID"]).strip() if msg["Message-ID"] else None,
            sender=sender, from_=from_, to=_addresses(msg.get_all("To")), cc=_addresses(msg.get_all("Cc")),
            bcc=_addresses(msg.get_all("Bcc")), reply_to=_addresses(msg.get_all("Reply-To")),
            headers=[(k, str(v)) for k, v in msg.items()], attachments=attachments,
            date_sent=sent.astimezone(UTC) if sent.tzinfo else sent.replace(tzinfo=UTC),
            date_received=now, date_created=now,
            in_reply_to=str(msg["In-Reply-To"]) if msg["In-Reply-To"] else None, references=refs,
            conversation_id=_conversation_id(refs, msg["Message-ID"]),
        )


def _addresses(values: list[str] | None) -> list[Address]:
    return [Address(email=addr, name=name) for name, addr in getaddresses([str(v) for v in values or []]) if addr]


def _first(values: list[str] | None) -> Address | None:
    found = _addresses(values)
    return found[0] if found else None


def _conversation_id(references: str | None, message_id: object) -> str:
    # Exchange threads by the first message of the chain; the root of References names it.
    root = (references or "").split()[:1] or [str(message_id or uuid.uuid4())]
    return "AAQk" + base64.urlsafe_b64encode(uuid.uuid5(uuid.NAMESPACE_URL, root[0]).bytes).decode().rstrip("=")


@dataclass
class Change:
    seq: int
    kind: str  # "create", "update", "delete", "read_flag"
    item_id: str


@dataclass
class Folder:
    mailbox: str
    display_name: str
    folder_class: str
    parent_id: str | None
    distinguished_id: str | None = None
    id: str = field(default_factory=new_id)
    items: dict[str, Item] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    version: int = 1

    @property
    def change_key(self) -> str:
        return "AQAAABYAAA" + base64.urlsafe_b64encode(f"{self.id[-8:]}:{self.version}".encode()).decode()

    @property
    def unread_count(self) -> int:
        return sum(1 for i in self.items.values() if not i.is_read)


@dataclass
class Mailbox:
    address: str
    display_name: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))  # the directory object id Graph also accepts
    folders: dict[str, Folder] = field(default_factory=dict)
    # Principals (lower-case user names) holding FullAccess (open the mailbox as a delegate) and SendAs.
    full_access: set[str] = field(default_factory=set)
    send_as: set[str] = field(default_factory=set)

    def folder(self, name_or_id: str) -> Folder | None:
        """A folder by distinguished id (``inbox``), Graph well-known name, id or display name."""
        key = name_or_id.lower()
        for f in self.folders.values():
            if f.id == name_or_id or f.distinguished_id == key:
                return f
        for f in self.folders.values():
            if f.display_name.lower() == key and f.distinguished_id is None:
                return f
        return None

    @property
    def inbox(self) -> Folder:
        return self.folder("inbox")  # type: ignore[return-value]

    @property
    def sent_items(self) -> Folder:
        return self.folder("sentitems")  # type: ignore[return-value]

    def find_item(self, item_id: str) -> Item | None:
        for f in self.folders.values():
            if item_id in f.items:
                return f.items[item_id]
        return None


@dataclass
class Principal:
    """Someone who can log in with a password (Basic auth): a mailbox owner or a service account."""

    username: str
    password: str
    mailbox: str | None = None
    impersonation: bool = False  # holds the ApplicationImpersonation management role


@dataclass
class App:
    """An app registration with a client secret (OAuth 2.0 client credentials)."""

    client_id: str
    client_secret: str
    # None: every mailbox (Mail.Send / full_access_as_app without an application access policy).
    mailboxes: set[str] | None = None


@dataclass
class IssuedToken:
    client_id: str
    audience: str
    expires_at: float


@dataclass
class SentRecord:
    """What the simulated transport accepted: one entry per submitted message."""

    protocol: str  # "ews" or "graph"
    mailbox: str  # whose mailbox submitted it
    sender: str
    recipients: list[str]
    mime: bytes
    message_id: str
    delivered_to: list[str]
    external: list[str]  # accepted for recipients outside the organization
    sent_item_id: str | None
    at: float
    # When the copy was filed and the recipients' copies delivered: ``at``, or later for a send told to
    # file late (``delivered_to``, ``external`` and ``sent_item_id`` are empty until then).
    filed_at: float | None = None


@dataclass
class LateFiling:
    """The next ``times`` sends through one API file their copies ``delay`` seconds after being accepted."""

    delay: float
    times: int = 1


@dataclass
class _Filing:
    """A send accepted, whose Sent Items copy (``folder``; None: no copy kept) and deliveries are due at ``due``."""

    record: SentRecord
    folder: Folder | None
    due: float


class Organization:
    """One simulated Exchange organization (tenant)."""

    def __init__(self, *, tenant: str = "simulated-tenant", domain: str = "sim.exchange.test",
                 clock: Callable[[], float] = time.time) -> None:
        self.tenant = tenant
        self.domain = domain
        self.clock = clock
        self.mailboxes: dict[str, Mailbox] = {}
        self.principals: dict[str, Principal] = {}
        self.apps: dict[str, App] = {}
        self.tokens: dict[str, IssuedToken] = {}
        self.sent: list[SentRecord] = []
        self._late: dict[str, list[LateFiling]] = {"ews": [], "graph": []}
        self._unfiled: list[_Filing] = []  # accepted sends whose filing is still to come
        self._seq = itertools.count(1)
        self.last_seq = 0

    # -- directory

    def add_mailbox(self, address: str, *, password: str | None = None, display_name: str | None = None) -> Mailbox:
        key = address.lower()
        if key in self.mailboxes:
            raise ValueError(f"mailbox {address} exists")
        box = Mailbox(address=address, display_name=display_name or address.split("@")[0])
        ids: dict[str, str] = {}
        for dist_id, name, cls, parent in WELL_KNOWN_FOLDERS:
            f = Folder(mailbox=address, display_name=name, folder_class=cls,
                       parent_id=ids.get(parent) if parent else None, distinguished_id=dist_id)
            ids[dist_id] = f.id
            box.folders[f.id] = f
        self.mailboxes[key] = box
        if password is not None:
            self.principals[key] = Principal(username=address, password=password, mailbox=address)
        return box

    def add_folder(self, address: str, name: str, *, parent: str = "msgfolderroot",
                   folder_class: str = "IPF.Note") -> Folder:
        box = self.mailbox(address)
        parent_folder = box.folder(parent)
        if parent_folder is None:
            raise KeyError(parent)
        f = Folder(mailbox=box.address, display_name=name, folder_class=folder_class, parent_id=parent_folder.id)
        box.folders[f.id] = f
        return f

    def add_service_account(self, username: str, password: str, *, impersonation: bool = False) -> Principal:
        p = Principal(username=username, password=password, impersonation=impersonation)
        self.principals[username.lower()] = p
        return p

    def grant_full_access(self, address: str, username: str) -> None:
        self.mailbox(address).full_access.add(username.lower())

    def grant_send_as(self, address: str, username: str) -> None:
        self.mailbox(address).send_as.add(username.lower())

    def add_app(self, client_id: str, client_secret: str, *, mailboxes: set[str] | None = None) -> App:
        app = App(client_id=client_id, client_secret=client_secret,
                  mailboxes={m.lower() for m in mailboxes} if mailboxes is not None else None)
        self.apps[client_id] = app
        return app

    def mailbox(self, address: str) -> Mailbox:
        return self.mailboxes[address.lower()]

    def find_mailbox(self, address: str | None) -> Mailbox | None:
        """A mailbox by SMTP address, or by directory object id (as Graph's ``/users/{id}`` allows)."""
        box = self.mailboxes.get((address or "").lower())
        if box is None and address:
            box = next((b for b in self.mailboxes.values() if b.id == address), None)
        return box

    def authenticate(self, username: str, password: str) -> Principal | None:
        p = self.principals.get(username.lower())
        if p is None and "\\" in username:  # DOMAIN\user logon names
            p = self.principals.get(username.split("\\", 1)[1].lower())
        if p is None or not secrets.compare_digest(p.password.encode(), password.encode()):
            return None
        return p

    # -- tokens

    def issue_token(self, client_id: str, audience: str, lifetime: float) -> tuple[str, IssuedToken]:
        token = "eyJ0eXAiOiJKV1Qi." + secrets.token_urlsafe(32)  # opaque to clients, shaped like a JWT's start
        issued = IssuedToken(client_id=client_id, audience=audience, expires_at=self.clock() + lifetime)
        self.tokens[token] = issued
        return token, issued

    def expire_tokens(self) -> None:
        """Make every issued token expired, as if its lifetime had passed."""
        for t in self.tokens.values():
            t.expires_at = min(t.expires_at, self.clock() - 1)

    # -- items and change log

    def now(self) -> datetime:
        return utc(self.clock())

    def add_item(self, folder: Folder, item: Item) -> Item:
        item.folder_id = folder.id
        folder.items[item.id] = item
        self._log(folder, "create", item.id)
        return item

    def update_item(self, folder: Folder, item: Item, *, read_flag_only: bool = False) -> None:
        item.version += 1
        self._log(folder, "read_flag" if read_flag_only else "update", item.id)

    def delete_item(self, folder: Folder, item_id: str) -> None:
        if folder.items.pop(item_id, None) is not None:
            self._log(folder, "delete", item_id)

    def move_item(self, item: Item, source: Folder, target: Folder) -> Item:
        # Exchange gives a moved item a new id in its new folder.
        self.delete_item(source, item.id)
        moved = copy.deepcopy(item)
        moved.id = new_id()
        moved.version = 1
        return self.add_item(target, moved)

    def deliver_mime(self, box: Mailbox, mime: bytes, folder: str = "inbox") -> Item:
        """Put a message in a mailbox as if it had arrived from outside (for ingest tests)."""
        target = box.folder(folder)
        if target is None:
            raise KeyError(folder)
        return self.add_item(target, Item.from_mime(mime, target.id, now=self.now()))

    def _log(self, folder: Folder, kind: str, item_id: str) -> None:
        seq = next(self._seq)
        self.last_seq = seq
        folder.changes.append(Change(seq=seq, kind=kind, item_id=item_id))
        folder.version += 1

    # -- sending

    def submit(self, protocol: str, box: Mailbox, mime: bytes, *, save_copy: bool = True,
               extra_recipients: list[Address] | None = None, saved_folder: Folder | None = None) -> SentRecord:
        """Submit a message from ``box``: file it in Sent Items and deliver it to the organization's mailboxes,
        now or, if ``protocol``'s sends were told to file late, once that delay has passed (``file_due``).

        Recipients come from the MIME ``To``, ``Cc`` and ``Bcc`` headers (as Exchange reads them from
        uploaded MIME content) plus ``extra_recipients`` given as item properties.
        """
        mime = _ensure_message_id(mime, self.domain)
        template = Item.from_mime(mime, "", now=self.now())
        recipients: list[str] = []
        for a in [*template.to, *template.cc, *template.bcc, *(extra_recipients or [])]:
            if a.email.lower() not in (r.lower() for r in recipients):
                recipients.append(a.email)
        record = SentRecord(
            protocol=protocol, mailbox=box.address,
            sender=(template.from_.email if template.from_ else box.address), recipients=recipients, mime=mime,
            message_id=template.internet_message_id or "", delivered_to=[], external=[], sent_item_id=None,
            at=self.clock(),
        )
        self.sent.append(record)
        filing = _Filing(record, (saved_folder or box.sent_items) if save_copy else None,
                         due=record.at + self._filing_delay(protocol))
        if filing.due > record.at:
            self._unfiled.append(filing)
        else:
            self._file(filing)
        return record

    def file_late(self, protocol: str, delay: float, times: int = 1) -> None:
        """The next ``times`` sends through ``protocol`` (``ews``, ``graph``) are accepted at once, but filed
        in Sent Items and delivered ``delay`` seconds later."""
        self._late[protocol].append(LateFiling(delay=delay, times=times))

    def file_due(self) -> None:
        """Carry out the late filings whose time has come (by ``clock``), in the order they came due."""
        if not self._unfiled:
            return
        now = self.clock()
        due = sorted((f for f in self._unfiled if f.due <= now), key=lambda f: f.due)
        if due:
            self._unfiled = [f for f in self._unfiled if f.due > now]
            for filing in due:
                self._file(filing)

    def _filing_delay(self, protocol: str) -> float:
        pending = self._late.get(protocol)
        if not pending:
            return 0.0
        late = pending[0]
        late.times -= 1
        if late.times <= 0:
            pending.pop(0)
        return late.delay

    def _file(self, filing: _Filing) -> None:
        record, now = filing.record, self.now()
        if filing.folder is not None:
            saved = Item.from_mime(record.mime, filing.folder.id, now=now)
            saved.is_read = True
            self.add_item(filing.folder, saved)
            record.sent_item_id = saved.id
        inbound = _without_bcc(record.mime)
        for rcpt in record.recipients:
            target = self.find_mailbox(rcpt)
            if target is None:
                record.external.append(rcpt)
                continue
            self.add_item(target.inbox, Item.from_mime(inbound, target.inbox.id, now=now))
            record.delivered_to.append(target.address)
        record.filed_at = self.clock()


def _ensure_message_id(mime: bytes, domain: str) -> bytes:
    head, sep, _ = mime.partition(b"\r\n\r\n")
    if not sep:
        head, sep, _ = mime.partition(b"\n\n")
    for line in head.splitlines():
        if line[:11].lower() == b"message-id:":
            return mime
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    return f"Message-ID: {make_msgid(domain=domain)}".encode() + eol + mime


def _without_bcc(mime: bytes) -> bytes:
    """The MIME with its Bcc header (and folded continuation lines) removed, byte for byte otherwise."""
    head, sep, rest = mime.partition(b"\r\n\r\n")
    eol = b"\r\n"
    if not sep:
        head, sep, rest = mime.partition(b"\n\n")
        eol = b"\n"
    out, skipping = [], False
    for line in head.split(eol):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line[:4].lower() == b"bcc:"
        if not skipping:
            out.append(line)
    return eol.join(out) + sep + rest


def build_mime(*, sender: Address, to: list[Address], cc: list[Address], bcc: list[Address],
               reply_to: list[Address], subject: str, body: str, body_type: str,
               headers: list[tuple[str, str]], attachments: list[Attachment], domain: str, now: datetime) -> bytes:
    """MIME for a message given as properties (Graph JSON, EWS fields), as Exchange renders one."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = _header_address(sender)
    for name, addrs in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        if addrs:
            msg[name] = [_header_address(a) for a in addrs]
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=domain)
    for name, value in headers:
        msg[name] = value
    msg.set_content(body, subtype="html" if body_type.lower() == "html" else "plain")
    for a in attachments:
        maintype, _, subtype = a.content_type.partition("/")
        msg.add_attachment(a.content, maintype=maintype or "application", subtype=subtype or "octet-stream",
                           filename=a.name)
    return msg.as_bytes()


def _header_address(a: Address) -> HeaderAddress:
    local, _, domain = a.email.partition("@")
    return HeaderAddress(display_name=a.name or "", username=local, domain=domain)


@dataclass
class Fault:
    """A failure to inject: the next ``times`` matching calls fail this way instead of being served.

    ``status`` 500 on EWS is a SOAP fault carrying ``code`` (``ErrorServerBusy`` adds
    ``BackOffMilliseconds`` from ``retry_after``); 200 on EWS is an error response message with
    ``code``; any other status is a bare HTTP answer.  On Graph and the token endpoint the status is
    sent with the JSON error body and a ``Retry-After`` header when ``retry_after`` is set.
    ``operation`` narrows the fault to one EWS operation (``CreateItem``) or Graph action
    (``sendMail``, ``messages``, ``delta``, ``token``).  Two statuses are no failure of the call itself,
    which is served as usual (see ``answering``): ``LATE`` (0) holds its answer back ``delay`` seconds,
    a reply lost to a client whose timeout is shorter; ``DROP`` (-1) never answers and closes the
    connection instead (aborts it with a TCP reset when ``reset``).  Both make a send's outcome
    unknown to the client.  ``served`` does the same with an error status: the call is served as
    usual (a send is stored, filed in Sent Items and delivered) and only then answered with this
    failure, as a gateway answers 504 after Exchange acted but was slow to say so.  ``GARBLED`` (-2)
    is served too, and answered 200 with a body its ``Content-Encoding: gzip`` does not match, as a
    broken proxy answers: the client cannot read it.  ``TRICKLE`` (-3) is served too, and its answer
    written one byte every ``delay`` seconds, as a server or middlebox that stalls mid-answer: every
    read gets something, so a client's per-read timeout never trips.  ``close``: the error answer carries
    ``Connection: close`` and the connection is closed after it, as many gateways and load balancers
    (HAProxy, F5, ARR) answer their own error pages.
    """

    status: int
    code: str
    message: str = "The simulator injected this failure."
    retry_after: float | None = None
    operation: str | None = None
    times: int = 1
    delay: float = 0.0
    reset: bool = False
    served: bool = False
    close: bool = False


LATE = 0
DROP = -1
GARBLED = -2
TRICKLE = -3


class Faults:
    """Injected faults per API (``ews``, ``graph``, ``token``), consumed in order."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Fault]] = {"ews": [], "graph": [], "token": []}

    def add(self, api: str, fault: Fault) -> None:
        self._pending[api].append(fault)

    def take(self, api: str, operation: str) -> Fault | None:
        for fault in self._pending[api]:
            if fault.operation is None or fault.operation.lower() == operation.lower():
                fault.times -= 1
                if fault.times <= 0:
                    self._pending[api].remove(fault)
                return fault
        return None

    def clear(self) -> None:
        for queue in self._pending.values():
            queue.clear()
